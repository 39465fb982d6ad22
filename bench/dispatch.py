"""The measured dispatch table for `auto`, and the interleaved rows that prove it.

    python -m bench --device cpu --threads 2 --dispatch-table fused_s2s/backends/dispatch_cpu.py \\
        --out bench/results --name cpu-dispatch

Phase 1 times, on the layer, cell and attention cases of this device's list, every candidate
`auto` may choose (layers and cells: `native` and `cpp`; attention: `cpp` and `torch`)
beside the module or code it replaces, interleaved: one call of each implementation per
round, the order reversed every other round, so that a shared machine's drift hits all of
them alike. Each shape class (fused_s2s.backends.dispatch) gets the default (`native` for layers and
cells, `cpp` for attention) unless another candidate beat it (layers and cells: it and nn,
which runs native's kernel) by more than MARGIN in the median of the per-round ratios, and in
four rounds of five (their 20th percentile above 1), in every case of the class. Every run
pins the allocator's state first (bench.harness.steady_allocator). The table is written as a Python module,
which `fused_s2s.backends.dispatch` loads (a `dispatch_<kind>.py` in the package is in force on that
device kind).

Phase 2 times `auto` (with the new table) against the same baselines, interleaved again, on the
same cases plus the end-to-end models (the demo model and the PyTorch tutorial's encoder and
attention decoder, patched vs unpatched): these are the rows that show `auto` is never slower.
The load average is recorded with every case.
"""
from __future__ import annotations

import json
import os
import pprint
import re
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from fused_s2s.backends import dispatch

from . import attention, cells, end_to_end, layers
from .harness import Case, Context, Impl, Settings, dtype_name, environment, input_sets, make_call, short_reason
from .report import fmt_time

MARGIN = 0.05       # a candidate must beat the default by more than this (median per-round ratio)
MIN_ROUNDS = 5
MAX_ROUNDS = 200
CANDIDATES = {"layers": ("native", "cpp"), "cells": ("native", "cpp"), "attention": ("cpp", "torch")}
BASELINE = {"layers": "nn.", "cells": "nn.", "attention": "naive", "end_to_end": "plain"}
SAME_KERNEL_BASELINE = ("layers", "cells")  # nn's modules run what `native` runs


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------- cases


def _is_baseline(family: str, name: str) -> bool:
    return name.startswith(BASELINE[family])


def phase_cases(ctx: Context, phase: int, rx=None) -> List[Case]:
    """The cases of a phase with only the implementations it times: the candidates (phase 1)
    or `auto` (phase 2), each beside its baseline."""
    fams = [cells, attention, layers] + ([end_to_end] if phase == 2 else [])  # cheap first: a cut run keeps them
    out = []
    for fam in fams:
        for case in fam.cases(ctx, None if ctx.quick else fam.DISPATCH_CONFIGS):
            if phase == 1:
                keep = [f"ours:{b}" for b in CANDIDATES[case.family]]
            else:
                keep = ["ours:auto"]
            if rx is not None and not rx.search(case.id):
                continue
            impls = [i for i in case.impls if i.name in keep or (not i.ours and _is_baseline(case.family, i.name))]
            out.append(Case(**{**case.__dict__, "impls": impls}))
    order = {"cells": 0, "attention": 1, "layers": 2, "end_to_end": 3}
    cost = lambda c: c.config.get("T", 1) * c.config.get("B", 1) * c.config.get("H", c.config.get("A", 1)) ** 2  # noqa: E731
    return sorted(out, key=lambda c: (order[c.family], cost(c)))


# -------------------------------------------------------------------------------- timing


def _quantiles(xs: Sequence[float]):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=5, method="inclusive")
    return q[0], q[3]


def measure(case: Case, settings: Settings, budget_s: float) -> Dict[str, Any]:
    """Every implementation of `case`, interleaved round by round -> the JSON record."""
    record: Dict[str, Any] = dict(id=case.id, family=case.family, op=case.op, config=case.config,
                                  dtype=dtype_name(case.dtype), passes=case.passes, load=load(), results={})
    try:
        d = input_sets(case, Settings(settings.device, rotate=False))[0]
    except Exception as e:
        record["skip"] = f"inputs: {short_reason(e)}"
        return record
    calls, expected = {}, None
    for impl in case.impls:
        if impl.skip:
            record["results"][impl.name] = dict(skip=impl.skip)
            continue
        try:
            forward, wrt = impl.bind(d)
            with torch.no_grad():
                outs = [o.detach().double() for o in forward()]
            diff = None
            if expected is None:
                expected = outs
            else:
                diff = max((float((o - e).abs().max()) if o.numel() else 0.0) for o, e in zip(outs, expected))
            call = make_call(forward, wrt, case.passes)
            call()
            calls[impl.name] = call
            record["results"][impl.name] = dict(max_abs_diff=diff)
        except Exception as e:  # a failing implementation is a result, not a crash
            record["results"][impl.name] = dict(skip=short_reason(e))
    names = list(calls)
    if not names:
        return record
    t0 = time.perf_counter()
    for name in names:
        calls[name]()
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_s / per_round)))
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    for name, ts in times.items():
        lo, hi = _quantiles(ts)
        record["results"][name].update(ms=statistics.median(ts), p20_ms=lo, p80_ms=hi, rounds=len(ts))
    record["times"] = times
    record["load_after"] = load()
    return record


def ratios(record: Dict[str, Any], slow: str, fast: str) -> Optional[List[float]]:
    """Per-round ratios time(slow) / time(fast): > 1 means `fast` is faster."""
    t = record.get("times", {})
    if slow not in t or fast not in t:
        return None
    return [a / b for a, b in zip(t[slow], t[fast])]


def summary(xs: Optional[List[float]]) -> Optional[Dict[str, float]]:
    if not xs:
        return None
    lo, hi = _quantiles(xs)
    return dict(median=statistics.median(xs), p20=lo, p80=hi)


def baseline_of(record: Dict[str, Any]) -> Optional[str]:
    return next((n for n in record["results"] if _is_baseline(record["family"], n)), None)


# --------------------------------------------------------------------------------- table


def _class(record: Dict[str, Any]) -> str:
    c = record["config"]
    op = record["op"]
    size = c.get("Tq") if op in dispatch.ATTENTION_OPS else c["H"]
    return dispatch.shape_class(op, c.get("B", 1), size, record["passes"] == "fwd+bwd", c.get("T"))


def build_table(records: List[Dict[str, Any]], device: torch.device, env: Dict[str, Any],
                command: str) -> Dict[str, Any]:
    """Per (op, dtype, class): the default unless a candidate beat it in every case of the class."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in records:
        if r.get("times"):
            groups.setdefault((r["op"], r["dtype"], _class(r)), []).append(r)
    entries: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for (op, dtype, cls), recs in sorted(groups.items()):
        family = recs[0]["family"]
        default = dispatch.default(op, device)
        pick, best = default, 1.0 + MARGIN
        base = baseline_of(recs[0])
        # layers and cells: the baseline (nn) runs native's own kernel, so a candidate must beat
        # both, and a noisy native cannot make a loser look good; attention: the baseline is
        # other code, and the candidate only has to beat the default
        rivals = (f"ours:{default}", base) if family in SAME_KERNEL_BASELINE else (f"ours:{default}",)
        for cand in CANDIDATES[family]:
            if cand == default:
                continue
            # faster than each rival by more than MARGIN in the median and in 4 rounds of 5
            # (p20 > 1), in every case of the class
            pairs = [summary(ratios(r, other, f"ours:{cand}")) for r in recs for other in rivals]
            if pairs and all(m is not None and m["p20"] > 1.0 for m in pairs):
                worst = min(m["median"] for m in pairs)
                if worst > best:
                    pick, best = cand, worst
        vs = [summary(ratios(r, base, f"ours:{pick}")) for r in recs if base]
        vs = [v for v in vs if v]
        entries.setdefault(op, {}).setdefault(dtype, {})[cls] = dict(
            backend=pick, baseline=base,
            speedup=round(statistics.median([v["median"] for v in vs]), 3) if vs else None,
            cases=[r["id"] for r in recs],
            ms={n: round(v["ms"], 4) for n, v in recs[0]["results"].items() if v.get("ms") is not None})
    kind = "cpu" if device.type == "cpu" else env.get("device", "cuda")
    table = dict(schema=1, kind=kind, device_type=device.type,
                 measured=dict(device=env.get("device"), cpu=env.get("cpu"), torch=env.get("torch"),
                               date=env.get("date"), threads=torch.get_num_threads(), command=command,
                               margin=MARGIN, load=[r["load"] for r in records[:1]] + [load()]),
                 entries=entries)
    if device.type == "cuda":
        table["name_contains"] = env.get("device", "")
    return table


def write_table(path: str, table: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write('"""The dispatch table `auto` uses on this device kind, measured and written by the benchmark\n'
                f'runner ({table["measured"]["command"]}); regenerate it rather than editing it."""\n\n')
        f.write("TABLE = " + pprint.pformat(table, width=110, sort_dicts=False) + "\n")


# ------------------------------------------------------------------------------- results


def result_rows(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for r in records:
        base = baseline_of(r)
        for name, res in r["results"].items():
            if not name.startswith("ours:") or res.get("ms") is None:
                continue
            rows.append(dict(id=r["id"], family=r["family"], op=r["op"], config=r["config"], dtype=r["dtype"],
                             passes=r["passes"], backend=name, ms=res["ms"], p20_ms=res["p20_ms"],
                             p80_ms=res["p80_ms"], rounds=res["rounds"], baseline=base,
                             baseline_ms=r["results"].get(base, {}).get("ms") if base else None,
                             vs_baseline=summary(ratios(r, base, name)) if base else None,
                             max_abs_diff=res.get("max_abs_diff"), load=r["load"]))
    return rows


def markdown(env: Dict[str, Any], table: Dict[str, Any], rows: List[Dict[str, Any]], noise: Dict[str, Any]) -> str:
    lines = [f"# fused_s2s dispatch run: {env.get('device')}, {env['date'][:10]}", ""]
    lines += [f"- {k}: {env[k]}" for k in ("cpu", "torch", "python", "git_commit", "date", "cpu_threads") if k in env]
    lines += [f"- command: `{table['measured']['command']}`",
              "- timing: wall clock, implementations interleaved (one call each per round, order reversed "
              "every other round); `x` = median over rounds of baseline time / ours, [p20, p80] of those "
              "per-round ratios; `load` = 1/5/15-min load average when the case started",
              f"- noise: {noise['text']}", ""]
    lines += ["| case | ours | ours time | baseline | baseline time | x [p20, p80] | load |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        v = row["vs_baseline"]
        x = f"{v['median']:.2f} [{v['p20']:.2f}, {v['p80']:.2f}]" if v else "—"
        cfg = " ".join(f"{k}={val}" for k, val in row["config"].items())
        lines.append(f"| {row['family']}/{row['op']} {cfg} {row['dtype']} {row['passes']} | {row['backend'][5:]} | "
                     f"{fmt_time(row['ms'])} | {row['baseline']} | {fmt_time(row['baseline_ms'])} | {x} | {row['load']} |")
    lines.append("")
    return "\n".join(lines)


def noise_of(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """How far native's per-round ratio to nn (the same kernel: ideally 1) strays: the noise
    floor of this run."""
    meds = []
    for r in records:
        base = baseline_of(r)
        s = summary(ratios(r, base, "ours:native")) if base and r["family"] in ("layers", "cells") else None
        if s and r["family"] == "layers":
            meds.append(s["median"])
    if not meds:
        return dict(text="not measured (no native layer rows)")
    lo, hi = min(meds), max(meds)
    return dict(native_vs_nn_layers=[lo, hi],
                text=f"native (the same kernel as nn plus our module's Python) vs nn over the layer rows: "
                     f"median ratios {lo:.2f}–{hi:.2f}")


def run(args, ctx: Context, command: str) -> Dict[str, Any]:
    device = ctx.device
    settings = Settings(device)
    env = environment(device)
    budget = args.budget_ms / 1e3 if args.budget_ms else (0.02 if args.quick else 1.0)

    start = time.time()

    def measure_all(cases: List[Case], tag: str, share: float) -> List[Dict[str, Any]]:
        """Cases past the phase's share of --time-budget (or after Ctrl-C) are listed as not measured."""
        out = []
        deadline = None if args.time_budget is None else start + share * args.time_budget
        for i, case in enumerate(cases):
            if (deadline is not None and time.time() > deadline) or stopped:
                out.append(dict(id=case.id, family=case.family, op=case.op, config=case.config,
                                dtype=dtype_name(case.dtype), passes=case.passes, load=load(), results={},
                                skip="interrupted" if stopped else "time budget spent"))
                continue
            try:
                rec = measure(case, settings, budget)
            except KeyboardInterrupt:
                stopped.append(True)
                print("interrupted: writing what was measured", flush=True)
                continue
            out.append(rec)
            print(f"[{tag} {i + 1}/{len(cases)}] {case.id} (load {rec['load']}): " + "; ".join(
                f"{n} {fmt_time(v.get('ms')) if v.get('ms') is not None else 'skip'}"
                for n, v in rec["results"].items()), flush=True)
        return out

    rx = re.compile(args.filter) if args.filter else None
    stopped: List[bool] = []
    phase1 = measure_all(phase_cases(ctx, 1, rx), "candidates", 0.6)
    table = build_table(phase1, device, env, command)
    write_table(args.dispatch_table, table)
    # the new table in force for phase 2: loaded from the file just written
    dispatch.reset()
    import importlib.util
    spec = importlib.util.spec_from_file_location("_measured_table", args.dispatch_table)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dispatch._tables = [module.TABLE] + [t for t in dispatch._load_tables() if t["kind"] != table["kind"]]
    phase2 = measure_all(phase_cases(ctx, 2, rx), "auto", 1.0)
    records = phase1 + phase2
    rows = result_rows(phase1) + result_rows(phase2)
    noise = noise_of(phase1)
    data = dict(schema=1, kind="dispatch", environment=env, table=table, noise=noise, rows=rows,
                measurements=[{k: v for k, v in r.items()} for r in records])
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{env['date'][:10]}-{'cpu' if device.type == 'cpu' else 'cuda'}-dispatch")
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(env, table, rows, noise))
    print(f"wrote {args.dispatch_table}, {stem}.json, {stem}.md", flush=True)
    return data
