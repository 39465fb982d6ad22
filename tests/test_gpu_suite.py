"""bench/gpu_suite.sh without a GPU: its syntax, its stage list and time limits in a dry run, that
a failing stage never stops the rest, and the per-family verdict read from the logs."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_suite.sh")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_verdict  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")
EARLY = ["build", "selftest_build", "triton_checks", "selftest", "selftest_memcheck", "selftest_racecheck",
         "cuda_checks", "nan_rows"]
LATE = ["suite", "memcheck", "racecheck", "initcheck", "bench"]


def dry_run(tmp_path, **env):
    out = tmp_path / "out"
    result = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **env))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, (out / "summary.txt").read_text()


def verdict_lines(summary):
    return dict(re.findall(r"^VERDICT (\S+)\s+(.*)$", summary, re.M))


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_runs_every_stage_in_order_within_its_limits(tmp_path):
    stdout, summary = dry_run(tmp_path)
    started = re.findall(r"^=== (\S+) \(limit (\d+)s\)", stdout, re.M)
    names = [n for n, _ in started]
    # the three first stages start together; the rest in order
    assert sorted(names[:3]) == sorted(EARLY[:3]) and names[3:] == EARLY[3:] + LATE
    table = {line.split("|")[0]: line.split("|") for line in open(SCRIPT).read().split('STAGE_TABLE="')[1]
             .split('"')[0].split() if "|" in line}
    for name, limit in started:
        cap, reserve = int(table[name][2]), int(table[name][3])
        assert 10 <= int(limit) <= min(cap, 560 - reserve)
    # what the first ~5 minutes may take at most, the three parallel ones counted once
    early = max(int(table[n][2]) for n in EARLY[:3]) + sum(int(table[n][2]) for n in EARLY[3:])
    assert early <= 600
    verdicts = verdict_lines(summary)
    assert set(verdicts) == set(gpu_verdict.FAMILIES)
    assert all(v.startswith("verified") for v in verdicts.values()), verdicts


def test_a_failing_stage_never_stops_the_rest(tmp_path):
    stdout, summary = dry_run(tmp_path, DRY_RUN_FAIL="cuda_checks")
    assert re.findall(r"^=== (\S+) \(limit", stdout, re.M)[-len(LATE):] == LATE
    verdicts = verdict_lines(summary)
    assert verdicts["cuda-persistent"].startswith("FAILED") and "cuda_checks: dry run" in verdicts["cuda-persistent"]
    assert verdicts["cuda-attention"].startswith("verified")


def test_stages_past_the_budget_are_skipped_and_unverified(tmp_path):
    stdout, summary = dry_run(tmp_path, SUITE_SECONDS="100")
    assert "=== build: skipped, no time left" in stdout
    assert all(v.startswith("unverified") for v in verdict_lines(summary).values())


def test_verdict_names_the_first_failing_case(tmp_path):
    logs = tmp_path
    (logs / "stages.tsv").write_text(
        "selftest\tcuda-cells,cuda-attention\tFAILED rc=1\t3\tselftest.log\n"
        "memcheck\tcuda-cells,cuda-attention,cuda-persistent\tFAILED rc=3\t9\tmemcheck.log\n"
        "cuda_checks\tcuda-persistent\tok\t50\tcuda_checks.log\n"
        "suite\ttriton-cells,triton-attention,triton-persistent\tTIMEOUT\t170\tsuite.log\n")
    (logs / "selftest.log").write_text("ok   gru f32 B=1 H=1 fwd h_new: 1 elements, max err 0\n"
                                       "FAIL additive f32 Bq=3 Bk=3 Tq=2 Tk=40 D=16 Dv=8 nan fwd lse: 6 elements\n"
                                       "1 FAILED\n")
    (logs / "memcheck.log").write_text(
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at void fused_s2s::persistent::backward_kernel<float>(...)+0x10\n"
        "========= ERROR SUMMARY: 1 error\n")
    (logs / "cuda_checks.log").write_text("CHECK cuda-persistent ok chunked GRU bwd fp32 H=1024 B=16 T=64: fine\n")
    (logs / "suite.log").write_text("")
    (logs / "suite.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_persistent" name="test_triton_functions_match_the_reference[x-triton-cuda-bfloat16-gru]"/>'
        '<testcase classname="tests.test_triton_kernels" name="test_gru_cell[cuda-bfloat16-(5, 33, True)]">'
        '<failure message="boom"/></testcase>'
        '<testcase classname="tests.test_cpp_backend" name="test_gru_cell[float32-5-33-True]"/>'
        '</testsuite></testsuites>')
    v = gpu_verdict.verdicts(str(logs))
    assert v["cuda-attention"].startswith("FAILED") and "nan fwd lse" in v["cuda-attention"]
    assert v["cuda-cells"].startswith("FAILED") and "memcheck" in v["cuda-cells"]  # failed stage, no case of its own
    assert v["cuda-persistent"].startswith("FAILED") and "Invalid __global__ read" in v["cuda-persistent"]
    assert v["triton-cells"].startswith("FAILED") and "test_gru_cell[cuda-bfloat16" in v["triton-cells"]
    assert v["triton-persistent"].startswith("unverified") and "TIMEOUT" in v["triton-persistent"]
    assert v["triton-attention"].startswith("unverified")
    assert v["build"] == "unverified (nothing ran)"
