"""The benchmark runner works on CPU: tiny configs, valid JSON and Markdown, the required columns."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the bench package lives at the repository root, next to tests/

from bench import harness, report, run, sanitize_parity  # noqa: E402
QUICK = ["--device", "cpu", "--quick", "--backends", "torch", "--compile", "off", "--budget-ms", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    data = run.run_suite(QUICK + ["--out", str(out), "--name", "quick", "--plot"])
    return out, data


def test_writes_json_markdown_and_plot(quick_run):
    out, data = quick_run
    assert {p.name for p in out.iterdir()} == {"quick.json", "quick.md", "quick.png"}
    with open(out / "quick.json") as f:
        loaded = json.load(f)
    assert loaded["rows"] == json.loads(json.dumps(data["rows"]))
    env = loaded["environment"]
    for key in ("device", "torch", "triton", "python", "git_commit", "date"):
        assert key in env
    assert loaded["roofline"]["copy_bytes_per_s"] > 0
    assert loaded["roofline"]["matmul_flops_per_s"]["float32"] > 0
    assert loaded["backends"] == {"torch": None}


def test_every_family_has_rows_with_baselines(quick_run):
    _, data = quick_run
    families = {r["family"] for r in data["rows"]}
    assert {"cells", "layers", "attention"} <= families
    for row in data["rows"]:
        assert row["backend"] == "ours:torch"
        assert row["ours_ms"] > 0
        assert row["reps"] >= harness.MIN_REPS and isinstance(row["noisy"], bool)
        assert all(x is not None and x >= 0 for x in row["spread"]), row["id"]
        assert row["speedup"] is not None and row["speedup"] > 0, row["id"]
        assert row["best_baseline"] in row["baselines"]
        # the baselines computed the same thing as ours
        for impl, diff in row["max_abs_diff"].items():
            assert diff < 1e-3, (row["id"], impl, diff)
    attention = [r for r in data["rows"] if r["family"] == "attention" and r["op"] == "dot_attention"]
    assert attention and all({"naive", "compile(naive)", "sdpa"} <= set(r["baselines"]) for r in attention)
    skips = {r["baseline_skips"].get("compile(naive)") for r in attention}
    assert skips == {"torch.compile disabled (--compile off)"}


def test_markdown_table_has_required_columns(quick_run):
    out, data = quick_run
    text = (out / "quick.md").read_text()
    tables = [ln for ln in text.splitlines() if ln.startswith("| config |")]
    assert len(tables) == len({(r["family"], r["op"]) for r in data["rows"]})
    for header in tables:
        cols = [c.strip() for c in header.strip("|").split("|")]
        for required in report.REQUIRED_COLUMNS:
            assert required in cols, (required, header)
    assert "copy bandwidth" in text and "torch.compile disabled" in text


def test_rows_speedup_and_roofline():
    m = dict(id="x", family="cells", op="gru_cell", config={"B": 1}, dtype="float32", passes="fwd",
             timing="events", flops=1e6, bytes=1e6, transcendentals=0, unit=None, results=[
                 dict(impl="ours:cpp", ours=True, ms=1.0, peak_bytes=None, max_abs_diff=None, skip=None),
                 dict(impl="ours:triton", ours=True, ms=None, peak_bytes=None, max_abs_diff=None, skip="no GPU"),
                 dict(impl="nn.GRUCell", ours=False, ms=2.0, peak_bytes=None, max_abs_diff=0.0, skip=None),
                 dict(impl="compiled", ours=False, ms=None, peak_bytes=None, max_abs_diff=None, skip="OOM")])
    roof = {"copy_bytes_per_s": 2e9, "matmul_flops_per_s": {"float32": 1e12}}
    (row,) = report.rows([m], roof)
    assert row["speedup"] == pytest.approx(2.0) and row["best_baseline"] == "nn.GRUCell"
    assert row["bound"] == "memory"                     # intensity 1 FLOP/B < 500 FLOP/B balance
    assert row["gb_per_s"] == pytest.approx(1.0) and row["copy_fraction"] == pytest.approx(0.5)
    text = report.markdown(dict(environment={"date": "2026-01-01", "device": "d"}, roofline=roof,
                                backends={"cpp": None}, settings={}, measurements=[m], rows=[row]))
    line = next(ln for ln in text.splitlines() if ln.startswith("| B=1"))
    assert row["spread"] == [None, None] and not row["noisy"]  # a record without spreads
    assert "OOM" in line and "2.00x vs nn.GRUCell" in line and "50% of copy" in line
    assert "ours:triton in 1 row(s): no GPU" in text


@pytest.mark.parametrize("times", [[1.0, 20.0, 30.0], [7.0], [2.0, 1.0], [1.0, 1.0, 1.0, 50.0, 2.0]])
def test_summary_stays_within_the_samples(times):
    """Quartiles by the inclusive method: never an impossible figure (the exclusive method puts
    the 20th and 80th percentiles of [1, 20, 30] at -2.8 and 32)."""
    t = harness.summary(times)
    assert min(times) == t.min_ms <= t.q1_ms <= t.median_ms <= t.q3_ms <= t.max_ms == max(times)
    assert t.reps == len(times) and t.spread >= 0
    assert harness.summary([1.0, 2.0, 30.0]).q1_ms == 1.5


def test_every_measurement_has_the_minimum_repetitions():
    slow = harness.Settings(torch.device("cpu"), budget_ms=0.01, warmup_ms=0.0)  # one call would fill it
    t = harness.measure([lambda: time.sleep(0.001)], slow)
    assert t.reps == harness.MIN_REPS >= 10


def _measurement(spread_ours, spread_baseline):
    return dict(id="x", family="cells", op="gru_cell", config={"B": 1}, dtype="float32", passes="fwd",
                timing="wall", flops=0, bytes=0, transcendentals=0, unit=None, results=[
                    dict(impl="ours:cpp", ours=True, ms=1.0, spread=spread_ours, reps=10, peak_bytes=None,
                         max_abs_diff=None, skip=None),
                    dict(impl="nn.GRUCell", ours=False, ms=2.0, spread=spread_baseline, reps=10, peak_bytes=None,
                         max_abs_diff=0.0, skip=None)])


def test_noisy_rows_are_flagged():
    roof = {"copy_bytes_per_s": 1e9, "matmul_flops_per_s": {}}
    quiet, noisy_ours, noisy_baseline = report.rows([_measurement(0.05, 0.03), _measurement(0.6, 0.03),
                                                     _measurement(0.05, 0.3)], roof)
    assert not quiet["noisy"] and noisy_ours["noisy"] and noisy_baseline["noisy"]
    assert quiet["spread"] == [0.05, 0.03]
    text = report.markdown(dict(environment={"date": "2026-01-01", "device": "d"}, roofline=roof, backends={},
                                settings={}, measurements=[], rows=[quiet, noisy_ours]))
    lines = [ln for ln in text.splitlines() if ln.startswith("| B=1")]
    assert "(noisy)" not in lines[0] and "| 5% / 3% |" in lines[0]
    assert "2.00x vs nn.GRUCell (noisy)" in lines[1] and "| 60% / 3% |" in lines[1]
    assert "1 of 2 rows are noisy" in text


def test_a_skip_reason_is_logged_once_in_full(tmp_path, monkeypatch, capsys):
    reason = "pretend this backend cannot run here, " + "for a reason long enough to be cut " * 4 + "(end)"
    monkeypatch.setattr(harness, "unsupported", lambda ctx, backend, ops, dtype: reason if backend == "triton" else None)
    run.run_suite(QUICK[:4] + ["torch,triton"] + QUICK[5:] + ["--out", str(tmp_path), "--family", "cells",
                                                              "--filter", "B=1,"])
    err = capsys.readouterr().err
    assert err.count(reason) == 1 and f"ours:triton not run: {reason}\n" in err
    rows = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert len(rows) >= 2 and all("ours:triton not run;" in ln for ln in rows)


def test_default_output_folder_is_outside_the_package():
    assert run.parse_args([]).out == "bench_out"


def test_time_budget_still_writes_results(tmp_path):
    data = run.run_suite(QUICK + ["--out", str(tmp_path), "--name", "b", "--family", "cells", "--time-budget", "0"])
    assert data["rows"] == []
    results = [r for m in data["measurements"] for r in m["results"] if not r["impl"].startswith("compile")]
    assert results and all(r["skip"].startswith("time budget") for r in results)
    assert (tmp_path / "b.md").exists()


def test_script_entry_point_lists_cases():
    out = subprocess.run([sys.executable, os.path.join("bench", "run.py"), "--device", "cpu", "--list"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = out.stdout.split("\n")
    # the configurations the benchmark issue lists
    assert any("cells/gru_cell/B=256,H=1024/float32/fwd+bwd" in i for i in ids)
    assert any("layers/LSTM/cfg=long,T=1024,B=16,H=768,dir=uni/bfloat16/fwd" in i for i in ids)
    assert any("attention/additive_attention/cfg=torch-bench,B=1280,Tq=1,Tk=66,A=1024" in i for i in ids)
    assert any("attention/dot_attention/cfg=all-queries,B=32,Tq=1024,Tk=1024,A=256" in i for i in ids)
    assert any("end_to_end/greedy_loop/cfg=gru-bahdanau" in i and "[step]" in i for i in ids)
    # cells, attention rows with Tq = 1, and the greedy loop of the two demo configs
    assert sum("[step]" in i for i in ids) == 48 + 2 * 2 * 5 + 2


def test_sanitize_parity_script_passes_on_cpu(capsys):
    assert sanitize_parity.main(["--device", "cpu", "--backends", "torch"]) == 0
    assert "0 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_baseline_runs(tmp_path):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    data = run.run_suite(["--device", "cpu", "--quick", "--backends", "torch", "--budget-ms", "2", "--threads", "1",
                          "--out", str(tmp_path), "--family", "cells", "--filter", "gru_cell/B=1,.*/fwd$"])
    (row,) = data["rows"]
    assert row["baselines"]["compile(reference.gru_cell)"] is not None, row["baseline_skips"]
