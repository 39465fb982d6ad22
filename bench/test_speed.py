"""The benchmark cases as pytest-benchmark tests, one group per case:

    pytest bench/test_speed.py                       # CUDA when present, else the --quick configs
    pytest bench/test_speed.py -k "attention and decoder-step" --benchmark-columns=median,iqr

pytest-benchmark times with the host clock, so each CUDA call is followed by a synchronize:
these numbers include launch and synchronisation costs. The runner (`python -m bench`) is the
reference for the published tables (CUDA events, rotated inputs, CUDA graphs, roofline).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import run  # noqa: E402
from bench.harness import Compiler, Context, input_sets, make_call, Settings  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CTX = Context(device=DEVICE, compiler=Compiler(os.environ.get("FUSED_S2S_BENCH_COMPILE", "dynamic")),
              backends=["torch", "cpp", "triton"], quick=DEVICE.type == "cpu")
CASES = [c for family in run.FAMILIES.values() for c in family.cases(CTX)]


@pytest.mark.parametrize("case,impl", [pytest.param(c, i, id=f"{c.id}/{i.name}") for c in CASES for i in c.impls])
def test_speed(benchmark, case, impl):
    if impl.skip:
        pytest.skip(impl.skip)
    benchmark.group = case.id
    inputs = input_sets(case, Settings(DEVICE, rotate=False))[0]
    call = make_call(*impl.bind(inputs), case.passes)

    def timed():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark(timed)
