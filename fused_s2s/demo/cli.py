"""Command line: `python -m fused_s2s demo | info | bench` (also installed as `fused-s2s`)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

AMP = {"off": None, "bf16": "bfloat16", "fp16": "float16"}  # --amp -> torch dtype name (torch loads lazily)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-s2s", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train an attention seq2seq model on the built-in date task",
                          description="Train an attention encoder-decoder on the built-in task (dates written "
                                      "many ways -> ISO dates), report held-out exact-match accuracy and "
                                      "tokens/s, show translations and write an attention heat-map.")
    demo.add_argument("--cell", choices=("gru", "lstm"), default="gru", help="recurrent cell (default: gru)")
    demo.add_argument("--attention", choices=("bahdanau", "dot", "general", "concat"), default="bahdanau",
                      help="bahdanau (Bahdanau et al.) or a Luong score with input feeding (default: bahdanau)")
    demo.add_argument("--backend", choices=("auto", "torch", "cpp", "triton", "native"), default="auto",
                      help="kernels for every cell and attention call (default: auto)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    demo.add_argument("--hidden-size", type=_positive_int, default=128,
                      help="decoder state and encoder output size (default: 128)")
    demo.add_argument("--embedding-size", type=_positive_int, default=32, help="default: 32")
    demo.add_argument("--layers", type=_positive_int, default=1, help="encoder and decoder layers (default: 1)")
    demo.add_argument("--dropout", type=float, default=0.0, help="default: 0")
    demo.add_argument("--amp", choices=tuple(AMP), default="off",
                      help="mixed-precision training: bf16, or fp16 with a GradScaler (default: off)")
    demo.add_argument("--steps", type=_positive_int, default=1000,
                      help="training steps (default: 1000; about a minute on a 2-core CPU, seconds on a GPU)")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="default: 64")
    demo.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    demo.add_argument("--train-size", type=_positive_int, default=20000, help="training pairs (default: 20000)")
    demo.add_argument("--test-size", type=_positive_int, default=1000,
                      help="held-out pairs, on calendar days never seen in training (default: 1000)")
    demo.add_argument("--beam-size", type=_positive_int, default=5,
                      help="beam size for the second evaluation (default: 5; 1 skips it)")
    demo.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: 0)")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads for torch (default: 1 on CPU, where these small matrices "
                           "gain nothing from more; torch's default otherwise)")
    demo.add_argument("--out", default="fused_s2s_demo",
                      help="folder for the checkpoint model.pt and the heat-map attention.png, replacing "
                           "an earlier run's (default: ./fused_s2s_demo)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars (shown only when stderr is a terminal)")

    sub.add_parser("info", help="print which backends are available here and why not")

    bench = sub.add_parser("bench", help="run the benchmark suite (from a source checkout); "
                                         "arguments after `bench` go to it", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark runner, --help included
        return run_bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "info":
        import fused_s2s
        print(fused_s2s.info())
        return 0
    from fused_s2s import BackendUnavailable
    try:
        with warnings.catch_warnings():
            # the program is ours: a warning is one line, not the file and line of our code
            warnings.showwarning = _one_line_warning
            return run_demo(args)
    except BackendUnavailable as error:
        sys.stderr.write(f"fused-s2s demo: {error}\n")
        return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    (file or sys.stderr).write(f"{category.__name__}: {message}\n")


def run_bench(argv: List[str]) -> int:
    """Forward `argv` to the benchmark runner `bench.run.main`."""
    try:
        from bench.run import main as bench_main
    except ImportError as error:
        if getattr(error, "name", None) not in ("bench", "bench.run"):
            raise
        sys.stderr.write("fused-s2s bench: the benchmark suite is not importable ("
                         f"{error}). It lives in the bench/ folder of the source checkout: run this "
                         "command from the repository root.\n")
        return 2
    result = bench_main(argv)
    return int(result or 0)


# ----------------------------------------------------------------------------------- demo


def _distributed(device_arg: Optional[str]):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) this joins the process
    group: gloo on CPU, NCCL on CUDA, one GPU per local rank."""
    import torch
    import torch.distributed as dist

    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fused-s2s demo: --device {device_arg}: no CUDA device is available here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def save_heatmap(path: str, weights, source: str, output: str) -> None:
    """Attention weights (len(output)+1 steps, len(source)+1 positions, EOS included) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    src_labels, out_labels = list(source) + ["</s>"], list(output) + ["</s>"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(src_labels) + 2.5), 0.3 * len(out_labels) + 1.8))
    image = ax.imshow(weights[: len(out_labels), : len(src_labels)], cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, cax=make_axes_locatable(ax).append_axes("right", size=0.15, pad=0.1),
                 label="attention weight")  # a bar as tall as the picture
    ax.set_xticks(range(len(src_labels)), [c if c != " " else "␣" for c in src_labels], fontsize=8)
    ax.set_yticks(range(len(out_labels)), out_labels, fontsize=8)
    ax.set_xlabel("source character")
    ax.set_ylabel("output character")
    ax.set_title(f"greedy decoding's attention\nsource: {source}\noutput: {output}", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401 - the heat-map is drawn last: fail now, not after training
    except ImportError as error:
        raise SystemExit(f"fused-s2s demo: matplotlib, which draws the attention heat-map, does not "
                         f"import ({error}): pip install matplotlib") from None
    import torch

    from fused_s2s.functional import backend_for

    from .data import date_task, date_vocabs, encode_sources, training_batches
    from .decoding import greedy_decode, translate
    from .models import Seq2Seq
    from .train import evaluate, load_checkpoint, save_checkpoint, train

    rank, world, device = _distributed(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    train_pairs, test_pairs = date_task(args.train_size, args.test_size, args.seed)
    src_vocab, tgt_vocab = date_vocabs()
    model = Seq2Seq(len(src_vocab), len(tgt_vocab), args.embedding_size, args.hidden_size, args.layers, args.cell,
                    args.attention, dropout=args.dropout, backend=args.backend).to(device)
    # what runs each part while training (the choice of `auto` depends on the shapes)
    kernels = {op: backend_for(op, device, batch=args.batch_size, size=args.hidden_size, training=True,
                               backend=None if args.backend == "native" and "attention" in op else args.backend)
               for op in (args.cell.upper(), f"{args.cell}_cell",
                          "additive_attention" if args.attention in ("bahdanau", "concat") else "dot_attention")}
    say(f"fused_s2s demo: dates written many ways -> ISO dates ({len(train_pairs)} train, {len(test_pairs)} "
        f"held-out pairs), e.g. {train_pairs[0][0]!r} -> {train_pairs[0][1]!r}")
    say(f"model: {args.cell.upper()} encoder-decoder, {args.attention} attention, hidden {args.hidden_size}, "
        f"{args.layers} layer(s), {sum(p.numel() for p in model.parameters()):,} parameters; device {device}"
        f"{f' x {world} processes' if world > 1 else ''}{f', mixed precision {args.amp}' if AMP[args.amp] else ''}; kernels: "
        + ", ".join(f"{op} -> {name}" for op, name in kernels.items()))

    checkpoint, heatmap = os.path.join(args.out, "model.pt"), os.path.join(args.out, "attention.png")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    earlier = [p for p in (checkpoint, heatmap) if os.path.exists(p)]
    say(f"outputs: {checkpoint}, {heatmap}" + ("; an earlier run's there are replaced" if earlier else ""))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    stream = training_batches(train_pairs, src_vocab, tgt_vocab, args.batch_size, seed=args.seed + rank)
    result = train(net, stream, args.steps, lr=args.lr, device=device, progress=not args.no_progress and rank == 0,
                   amp=getattr(torch, AMP[args.amp]) if AMP[args.amp] else None)
    say(f"train: {args.steps} steps in {result.seconds:.1f} s, {result.tokens_per_second * world:,.0f} tokens/s, "
        f"final loss {sum(result.losses[-20:]) / len(result.losses[-20:]):.4f}")
    if rank != 0:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return 0

    greedy = evaluate(model, test_pairs, src_vocab, tgt_vocab, beam_size=1, progress=not args.no_progress)
    say(f"held-out exact match, greedy: {greedy.accuracy:.1%} ({greedy.tokens_per_second:,.0f} tokens/s decode)")
    if args.beam_size > 1:
        beam = evaluate(model, test_pairs, src_vocab, tgt_vocab, beam_size=args.beam_size,
                        progress=not args.no_progress)
        say(f"held-out exact match, beam {args.beam_size}: {beam.accuracy:.1%} "
            f"({beam.tokens_per_second:,.0f} tokens/s decode)")

    save_checkpoint(checkpoint, model, src_vocab, tgt_vocab, accuracy=greedy.accuracy, steps=args.steps)
    shown = test_pairs[:6]
    reloaded = load_checkpoint(checkpoint, device=device, backend=args.backend)
    again = translate(reloaded.model, [s for s, _ in shown], reloaded.src_vocab, reloaded.tgt_vocab)
    say("translations (held-out):")
    for (source, target), prediction in zip(shown, greedy.predictions):
        say(f"  {'ok ' if prediction == target else 'BAD'} {source!r:32} -> {prediction!r}"
            + ("" if prediction == target else f"  (expected {target!r})"))
    same = again == greedy.predictions[: len(shown)]
    say(f"checkpoint: {checkpoint} (reloaded model decodes {'the same' if same else 'DIFFERENTLY'})")

    source = max((s for s, _ in test_pairs[:50]), key=len)  # a long one makes a readable picture
    src, lengths = encode_sources([source], src_vocab)
    model.eval()
    hyp = greedy_decode(model, src.to(device), lengths.to(device), return_attention=True)
    output = tgt_vocab.decode(hyp.tokens[0])
    save_heatmap(heatmap, hyp.attention[0].float().cpu().numpy(), source, output)
    say(f"attention heat-map: {heatmap}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
