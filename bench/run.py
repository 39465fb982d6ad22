"""The fused_s2s benchmark runner.

    python -m bench                          # everything, on CUDA when present
    python -m bench --filter attention --graphs --plot
    python -m bench --device cpu --quick     # small configs (what CI runs)
    python -m bench --list                   # the case ids, without running

Writes <out>/<date>-<device>.json (environment, roofline, every measurement, the rows) and
.md (one table per op); with --plot, a .png of the speed-ups. <out> is ./bench_out unless
--out says otherwise; bench/results/ holds the runs committed to the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

import torch  # noqa: E402

from bench import attention, cells, end_to_end, layers, report  # noqa: E402
from bench.harness import (DTYPES, NOISY_SPREAD, Case, Compiler, Context, Result, Settings, copy_bandwidth,  # noqa: E402
                           device_slug, dtype_name, environment, input_sets, matmul_rate, now_date, run_impl,
                           short_reason, steady_allocator)
from bench.report import fmt_time  # noqa: E402

FAMILIES = {"cells": cells, "layers": layers, "attention": attention, "end_to_end": end_to_end}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when present)")
    p.add_argument("--filter", default=None,
                   help="regular expression searched in each case id, e.g. 'cells/gru_cell/B=64' or 'attention|layers'")
    p.add_argument("--family", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    p.add_argument("--dtype", default="config",
                   help="'config' (each config's own dtype, as the issue lists them) or a comma-separated "
                        f"list of {', '.join(DTYPES)} replacing it")
    p.add_argument("--backends", default="torch,cpp,triton,native,auto",
                   help="our backends to measure (those present); native: PyTorch's own kernels on our modules, "
                        "auto: the default choice")
    p.add_argument("--dispatch-table", metavar="PATH", default=None,
                   help="measure the candidates of `auto` interleaved, write its dispatch table to PATH (e.g. "
                        "fused_s2s/backends/dispatch_cpu.py) and time `auto` against the baselines with it; see bench/dispatch.py")
    p.add_argument("--quick", action="store_true", help="small configs and short timing (CPU, CI)")
    p.add_argument("--graphs", action="store_true", help="also time per-step rows inside CUDA graphs")
    p.add_argument("--compile", choices=("dynamic", "static", "off"), default="dynamic",
                   help="torch.compile for the compiled baselines: one dynamic-shape compile per function "
                        "(default), one per shape, or off")
    p.add_argument("--budget-ms", type=float, default=None, help="timed calls per measurement, in ms (default 100; quick 10)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; the cases left when it runs out are recorded as not measured")
    p.add_argument("--out", default="bench_out",
                   help="output folder (default: ./bench_out; committed runs go to bench/results)")
    p.add_argument("--name", default=None, help="file name stem (default <date>-<device>[-quick])")
    p.add_argument("--plot", action="store_true", help="write a PNG chart of the speed-ups")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--list", action="store_true", help="print the case ids and exit")
    return p.parse_args(argv)


def build_cases(args: argparse.Namespace, ctx: Context) -> List[Case]:
    out: List[Case] = []
    for name in args.family.split(","):
        if name not in FAMILIES:
            raise SystemExit(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
        out += FAMILIES[name].cases(ctx)
    if args.filter:
        rx = re.compile(args.filter)
        out = [c for c in out if rx.search(c.id)]
    return out


def load_reason(backend: str) -> Optional[str]:
    """None if our backend loads here, else why not (only the backends asked for are loaded)."""
    from fused_s2s.backends import registry
    if backend == "auto":
        return None  # a choice among the others, always there
    try:
        registry.load(backend)
        return None
    except Exception as e:
        return str(e)


def measure_case(case: Case, settings: Settings, timing: str, graphs: bool, tag: str) -> List[Dict[str, Any]]:
    """Every implementation of one case, timed one way or two (CUDA graphs for per-step rows)."""
    out = []
    try:
        sets = input_sets(case, settings)
    except Exception as e:  # e.g. OOM making the inputs
        sets, why = None, f"inputs: {short_reason(e)}"
    modes = [(timing, False)] + ([("graph", True)] if graphs and case.step and settings.device.type == "cuda" else [])
    for mode, graph in modes:
        if sets is None:
            results = not_run(case, why)
        else:
            expected: List[Any] = []
            results = [run_impl(case, impl, sets, settings, graph, None if graph else expected)
                       for impl in case.impls]
            del expected
        out.append(report.measurement(case, mode, results))
        for r in results:
            if r.ms is None and (r.impl, r.skip) not in _said:  # each reason once, in full
                _said.add((r.impl, r.skip))
                _log(f"{r.impl} not run: {r.skip}")
        _log(f"{tag} {case.id} {mode}: " + "; ".join(
            f"{r.impl} {fmt_time(r.ms) + _noise(r) if r.ms is not None else 'not run'}" for r in results))
    del sets
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def not_run(case: Case, why: str) -> List[Result]:
    return [Result(impl.name, impl.ours, skip=impl.skip or why) for impl in case.impls]


def _noise(r: Result) -> str:
    return f" (spread {r.spread:.0%}: noisy)" if r.spread is not None and r.spread > NOISY_SPREAD else ""


_said: set = set()  # (implementation, reason it did not run) already logged in this run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point: run the suite, exit status 0."""
    run_suite(argv)
    return 0


def run_suite(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the cases the arguments select, write the outputs, return the JSON data."""
    args = parse_args(argv)
    steady_allocator()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    # (--list needs only the case ids: no backend is loaded)
    backend_notes = {} if args.list else {b: load_reason(b) for b in args.backends.split(",") if b}
    dtypes = None if args.dtype == "config" else [DTYPES[d] for d in args.dtype.split(",")]
    ctx = Context(device=device, compiler=Compiler(args.compile), quick=args.quick, dtypes=dtypes,
                  backends=[b for b, why in backend_notes.items() if why is None])
    cases = build_cases(args, ctx)
    if args.dispatch_table:
        from bench import dispatch
        return dispatch.run(args, ctx, "python -m bench " + " ".join(sys.argv[1:]))
    if args.list:
        for c in cases:
            print(c.id + ("  [step]" if c.step else ""))
        return {}

    budget_ms = args.budget_ms if args.budget_ms is not None else (10.0 if args.quick else 100.0)
    settings = Settings(device, budget_ms=budget_ms, warmup_ms=budget_ms / 4)
    _said.clear()
    t_start = time.time()
    env = environment(device)
    _log(f"device: {env.get('device')}; backends: "
         + ", ".join(f"{b}={'ok' if w is None else 'not run: ' + w}" for b, w in backend_notes.items()))
    roofline = {"copy_bytes_per_s": copy_bandwidth(device, args.quick), "matmul_flops_per_s": {}}
    for dt in sorted({c.dtype for c in cases}, key=str):
        roofline["matmul_flops_per_s"][dtype_name(dt)] = matmul_rate(device, dt, args.quick)
    _log(f"copy {roofline['copy_bytes_per_s'] / 1e9:.4g} GB/s; matmul "
         + ", ".join(f"{k} {v / 1e12:.4g} TFLOP/s" for k, v in roofline["matmul_flops_per_s"].items()))

    measurements: List[Dict[str, Any]] = []
    timing = "events" if device.type == "cuda" else "wall"
    families = list(dict.fromkeys(c.family for c in cases))
    stop: Optional[str] = None
    family_deadline: Dict[str, float] = {}
    for i, case in enumerate(cases):
        if stop is None and args.time_budget is not None:
            if case.family not in family_deadline:
                # each family gets an equal share of what is left, so a cut run has rows of each
                left = args.time_budget - (time.time() - t_start)
                later = len(families) - families.index(case.family)
                family_deadline[case.family] = time.time() + left / later
            if time.time() > family_deadline[case.family]:
                measurements.append(report.measurement(
                    case, timing, not_run(case, f"time budget of {args.time_budget:g} s spent")))
                continue
        if stop is not None:
            measurements.append(report.measurement(case, timing, not_run(case, stop)))
            continue
        try:
            measurements += measure_case(case, settings, timing, args.graphs, f"[{i + 1}/{len(cases)}]")
        except KeyboardInterrupt:  # e.g. a time limit around the run: keep what was measured
            stop = "interrupted"
            measurements.append(report.measurement(case, timing, not_run(case, stop)))
            _log("interrupted: writing the results measured so far")

    settings_out = dict(budget_ms=budget_ms, graphs=args.graphs, compile=args.compile, quick=args.quick,
                        dtype=args.dtype, filter=args.filter, family=args.family,
                        rotate_inputs_in_l2=settings.rotate, graph_steps=settings.graph_steps,
                        min_reps=settings.min_reps, noisy_spread=NOISY_SPREAD,
                        seconds=round(time.time() - t_start, 1))
    data = dict(schema=2, environment=env, settings=settings_out, backends=backend_notes, roofline=roofline,
                measurements=measurements, rows=report.rows(measurements, roofline))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{now_date()}-{device_slug(env)}{'-quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(data))
    written = [stem + ".json", stem + ".md"]
    if args.plot:
        try:
            report.plot(data, stem + ".png")
            written.append(stem + ".png")
        except Exception as e:
            _log(f"plot not written: {short_reason(e)}")
    noisy = sum(row["noisy"] for row in data["rows"])
    _log(f"{len(data['rows'])} rows in {settings_out['seconds']} s; wrote " + ", ".join(written))
    if noisy:
        _log(f"{noisy} row(s) noisy (spread above {NOISY_SPREAD:.0%}, marked in the table): "
             "the machine was busy, their ratios are not to be trusted")
    return data


if __name__ == "__main__":
    sys.exit(main())
