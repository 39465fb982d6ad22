"""How an op reaches a kernel: the plumbing under the public face.

- `reference`: the math in plain PyTorch, the specification every backend is tested against;
  `torch_backend`: the kernel contract (eight primitives) in PyTorch, the `torch` backend;
- `registry`: which backends exist and load here, and which one runs a per-step primitive;
  `dispatch` (+ the measured tables `dispatch_<kind>.py`): what "auto" runs per shape class;
  `build`: the toolchain rules that build the extension `fused_s2s._C`;
- `ops`: the primitives as torch.library custom ops; `autograd`: one Function per op;
  `layers`: a GRU/LSTM module call's layers and directions on the per-step or persistent
  kernels; `native`: the same call on PyTorch's own fused RNN;
  `persistent` + `persistent_autograd`: the whole-sequence kernels' plan and Functions;
- `tensors`: helpers the face shares with the plumbing (autocast casting, host reads);
  `info`: the report of `python -m fused_s2s info`.

Imports: torch, the compiled extension and `fused_s2s.triton_kernels`; never the public face
(`fused_s2s.functional`, `fused_s2s.modules`, `fused_s2s.patch`) nor the demo.
"""
