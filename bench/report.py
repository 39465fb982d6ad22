"""Rows, the Markdown table and the speed-up chart from the measurements of one run."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from .harness import NOISY_SPREAD, Case, Result, dtype_name

# columns every table has, in order (tests check them)
REQUIRED_COLUMNS = ("config", "dtype", "pass", "timing", "ours", "ours time", "speed-up", "spread", "roofline")


def measurement(case: Case, timing: str, results: List[Result]) -> Dict[str, Any]:
    """One case measured one way ("events", "graph" or "wall"): the JSON record."""
    return dict(id=case.id, family=case.family, op=case.op, config=case.config, dtype=dtype_name(case.dtype),
                passes=case.passes, timing=timing, flops=case.flops, bytes=case.bytes,
                transcendentals=case.transcendentals, unit=list(case.unit) if case.unit else None,
                results=[asdict(r) for r in results])


def _roof(m: Dict[str, Any], ms: float, roofline: Dict[str, Any]) -> Dict[str, Any]:
    """Achieved rate of our time against the floor that binds this op on this device."""
    if not (m["flops"] or m["bytes"]):
        return {}
    sec = ms * 1e-3
    bw = roofline["copy_bytes_per_s"]
    mm = roofline["matmul_flops_per_s"].get(m["dtype"])
    memory_bound = mm is None or not m["flops"] or (m["flops"] / max(m["bytes"], 1)) < mm / bw
    out = dict(bound="memory" if memory_bound else "compute",
               gb_per_s=m["bytes"] / sec / 1e9, copy_fraction=m["bytes"] / sec / bw)
    if m["flops"]:
        out["tflop_per_s"] = m["flops"] / sec / 1e12
        out["matmul_fraction"] = m["flops"] / sec / mm if mm else None
    if m["transcendentals"]:
        out["gtranscendental_per_s"] = m["transcendentals"] / sec / 1e9
    return out


def rows(measurements: List[Dict[str, Any]], roofline: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (measurement, our backend that ran): our time against every baseline."""
    out = []
    for m in measurements:
        results = m["results"]
        baselines = [r for r in results if not r["ours"]]
        timed = [r for r in baselines if r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        for r in results:
            if not r["ours"] or r["ms"] is None:
                continue
            # IQR / median of ours and of the best baseline: either too wide, the ratio means little
            spread = [r.get("spread"), best.get("spread") if best else None]
            row = dict(id=m["id"], family=m["family"], op=m["op"], config=m["config"], dtype=m["dtype"],
                       passes=m["passes"], timing=m["timing"], backend=r["impl"], ours_ms=r["ms"],
                       baselines={b["impl"]: b["ms"] for b in baselines},
                       baseline_skips={b["impl"]: b["skip"] for b in baselines if b["skip"]},
                       best_baseline=best["impl"] if best else None,
                       speedup=best["ms"] / r["ms"] if best else None,
                       spread=spread, noisy=any(x is not None and x > NOISY_SPREAD for x in spread),
                       reps=r.get("reps"),
                       speedups={b["impl"]: b["ms"] / r["ms"] for b in timed},
                       max_abs_diff={x["impl"]: x["max_abs_diff"] for x in results if x["max_abs_diff"] is not None},
                       peak_mib={x["impl"]: x["peak_bytes"] / 2 ** 20 for x in results if x["peak_bytes"] is not None},
                       **_roof(m, r["ms"], roofline))
            if m["unit"]:
                row[f"{m['unit'][0]}_per_s"] = m["unit"][1] / (r["ms"] * 1e-3)
            out.append(row)
    return out


# ------------------------------------------------------------------------------ markdown


def fmt_time(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms * 1e3:.3g} µs"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _roof_cell(row: Dict[str, Any]) -> str:
    if "bound" not in row:
        return "—"
    if row["bound"] == "memory":
        return f"{row['gb_per_s']:.3g} GB/s ({pct(row['copy_fraction'])} of copy)"
    frac = row.get("matmul_fraction")
    return f"{row['tflop_per_s']:.3g} TFLOP/s" + (f" ({pct(frac)} of matmul)" if frac is not None else "")


def _spread_cell(row: Dict[str, Any]) -> str:
    return " / ".join("—" if x is None else f"{100 * x:.0f}%" for x in row["spread"])


def pct(x: float) -> str:
    return f"{100 * x:.2g}%"


def _baseline_cell(row: Dict[str, Any], name: str) -> str:
    ms = row["baselines"].get(name)
    if ms is not None:
        return fmt_time(ms)
    return "OOM" if row["baseline_skips"].get(name) == "OOM" else "—"


def _config_cell(config: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def environment_lines(env: Dict[str, Any]) -> List[str]:
    keys = ("device", "driver", "torch", "torch_cuda", "cudnn", "triton", "python", "cpu", "git_commit",
            "git_dirty", "date", "matmul_allow_tf32", "cudnn_allow_tf32")
    return [f"- {k}: {env[k]}" for k in keys if k in env]


def markdown(data: Dict[str, Any]) -> str:
    env, roof = data["environment"], data["roofline"]
    lines = [f"# fused_s2s benchmarks: {env.get('device')}, {env['date'][:10]}", ""]
    lines += environment_lines(env)
    lines += ["", "Measured in this run: copy bandwidth "
              f"{roof['copy_bytes_per_s'] / 1e9:.4g} GB/s; matmul "
              + ", ".join(f"{k} {v / 1e12:.4g} TFLOP/s" for k, v in roof["matmul_flops_per_s"].items()), ""]
    lines.append("Backends: " + "; ".join(
        f"{name}: {'available' if why is None else 'not run (' + why + ')'}" for name, why in data["backends"].items()))
    lines += ["", f"Settings: {', '.join(f'{k}={v}' for k, v in data['settings'].items())}", ""]
    lines += ["Times are medians; speed-up = fastest baseline's time / ours (> 1: ours is faster); spread = "
              "interquartile range / median of ours and of that baseline. "
              "See bench/README.md for what each column means.", ""]
    noisy = [row for row in data["rows"] if row.get("noisy")]
    if noisy:
        lines += [f"**{len(noisy)} of {len(data['rows'])} rows are noisy** (spread above {pct(NOISY_SPREAD)}, "
                  "marked in the speed-up column): the machine was busy, their ratios are not to be trusted.", ""]

    groups: "OrderedDict[Any, List[Dict[str, Any]]]" = OrderedDict()
    for row in data["rows"]:
        groups.setdefault((row["family"], row["op"]), []).append(row)
    skipped = [m for m in data["measurements"] if not any(r["ours"] and r["ms"] is not None for r in m["results"])]
    for (family, op), group in groups.items():
        names = list(OrderedDict.fromkeys(n for row in group for n in row["baselines"]))
        cols = ["config", "dtype", "pass", "timing", "ours", "ours time"] + names + ["speed-up", "spread", "roofline"]
        if family == "attention":
            cols.append("peak MiB (ours / " + " / ".join(names) + ")")
        if any("tokens_per_s" in row for row in group):
            cols.append("tokens/s (ours)")
        lines += [f"## {family}: {op}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in group:
            speed = (f"{row['speedup']:.2f}x vs {row['best_baseline']}" if row["speedup"] is not None else "—")
            if row["noisy"]:
                speed += " (noisy)"
            cells = [_config_cell(row["config"]), row["dtype"], row["passes"], row["timing"],
                     row["backend"].replace("ours:", ""), fmt_time(row["ours_ms"])]
            cells += [_baseline_cell(row, n) for n in names] + [speed, _spread_cell(row), _roof_cell(row)]
            if family == "attention":
                peaks = row["peak_mib"]
                cells.append(" / ".join(f"{peaks[n]:.4g}" if n in peaks else "—" for n in [row["backend"]] + names))
            if "tokens_per_s" in row:
                cells.append(fmt_rate(row["tokens_per_s"]))
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")

    notes: "OrderedDict[Any, List[str]]" = OrderedDict()  # (impl, why) -> the ops' rows it concerns
    for m in data["measurements"]:
        for r in m["results"]:
            if r["skip"] and r["skip"] != "OOM":
                notes.setdefault((r["impl"], r["skip"]), []).append(f"{m['family']}/{m['op']}")
    diffs: "OrderedDict[Any, float]" = OrderedDict()
    for m in data["measurements"]:
        for r in m["results"]:
            if r.get("max_abs_diff") is not None:
                key = (m["family"], m["op"], m["dtype"], r["impl"])
                diffs[key] = max(diffs.get(key, 0.0), r["max_abs_diff"])
    if diffs:
        lines += ["## Output check", "",
                  "Largest |difference| of each implementation's outputs from the first one's on the same "
                  "inputs (a row never compares different computations unnoticed):", ""]
        lines += [f"- {f}/{op} {dt}: {impl} {d:.3g}" for (f, op, dt, impl), d in diffs.items()]
        lines.append("")
    if notes or skipped:
        lines += ["## Not measured", ""]
        for (impl, why), ops in notes.items():
            lines.append(f"- {impl} in {len(ops)} row(s): {why} ({', '.join(OrderedDict.fromkeys(ops))})")
        if skipped:
            lines.append(f"- {len(skipped)} measurement(s) with no timed backend of ours "
                         "(see the JSON `measurements` for each)")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plot


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in data["rows"] if r["speedup"] is not None]
    if not rs:
        return
    labels = [f"{r['op']} {_config_cell(r['config'])} {r['dtype']} {r['passes']} {r['timing']}" for r in rs]
    backends = list(OrderedDict.fromkeys(r["backend"] for r in rs))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.2 * len(rs)))
    ax.barh(range(len(rs)), [r["speedup"] for r in rs], color=[colors[r["backend"]] for r in rs])
    ax.set_yticks(range(len(rs)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed-up vs the fastest baseline (log scale, > 1: ours faster)")
    ax.set_title(f"fused_s2s on {data['environment'].get('device')}, {data['environment']['date'][:10]}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[b]) for b in backends]
    ax.legend(handles, backends, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
