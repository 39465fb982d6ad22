"""The GPU suite's verdict: one line per kernel family, read from the logs of bench/gpu_suite.sh.

    python bench/gpu_verdict.py LOGS_DIR

LOGS_DIR holds stages.tsv (one line per stage: name, families, status, seconds, log file) and
the stages' logs. Evidence, by source:
  - `CHECK <family> ok|FAIL|SKIP <case>` lines (bench/gpu_checks.py);
  - the CUDA selftest's `ok   <case>` / `FAIL <case>` lines (gru/lstm: cuda-cells, else
    cuda-attention) and sanitize_parity's, whose case names the op and the backend;
  - pytest junit XML (*.xml): each GPU test case, its family from the file and the test id;
  - compute-sanitizer's `ERROR SUMMARY`, blamed on the families of the kernels it names;
  - a stage that failed, timed out or was skipped without saying which case.
A family is verified when it has passing evidence and nothing failed, timed out or was skipped
among the stages that cover it; else FAILED with its first failing case, or unverified with why.
"""
from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

FAMILIES = ("build", "cuda-cells", "cuda-attention", "cuda-persistent", "triton-cells", "triton-attention",
            "triton-persistent")


def family_of(text: str, backend: Optional[str] = None) -> Optional[str]:
    """The kernel family a test id, case name or kernel name belongs to (None: no kernel)."""
    t = text.lower()
    if backend is None:
        backend = "triton" if "triton" in t else "cuda" if re.search(r"\bcpp\b|cuda|fused_s2s::|selftest", t) else None
    if backend is None:
        return None
    if "persistent" in t or re.search(r"\b(gru|lstm) (packed|lengths)|forward_kernel|backward_kernel", t):
        return f"{backend}-persistent"
    if "attention" in t or "additive" in t or re.search(r"\bdot\b|combine|dscores|softmax|column_sum", t):
        return f"{backend}-attention"
    if re.search(r"gru|lstm|cell|tanh|sigmoid", t):
        return f"{backend}-cells"
    return None


Evidence = Tuple[str, str, str]  # (family, "ok" | "FAIL" | "SKIP", case)


def _lines(path: str) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _from_log(path: str, stage: str, stage_families: List[str]) -> List[Evidence]:
    out: List[Evidence] = []
    lines = _lines(path)
    for line in lines:
        m = re.match(r"CHECK (\S+) (ok|FAIL|SKIP) (.*)", line)
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
            continue
        m = re.match(r"(ok|FAIL)\s+(\S.*?)(:|$)", line)  # the selftest's and sanitize_parity's case lines
        if m and stage.startswith(("selftest", "sanitize")):
            family = (family_of(m.group(2), "cuda") if stage.startswith("selftest") else family_of(m.group(2)))
            if family is not None:
                out.append((family, m.group(1), f"{stage}: {m.group(2)}"))
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", "\n".join(lines))]
    if any(errors):
        blamed = sorted({f for line in lines if re.match(r"=+\s+at ", line)
                         for f in [family_of(line, "triton" if "triton" in line.lower() else "cuda")] if f})
        first = next((line.strip("= ").strip() for line in lines if re.match(r"=+ (Invalid|Race|Uninit|Error|.*hazard)",
                                                                             line)), "errors")
        for family in blamed or stage_families:
            out.append((family, "FAIL", f"{stage}: {first}"))
    return out


def _from_junit(path: str) -> List[Evidence]:
    out: List[Evidence] = []
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return out
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        lowered = test_id.lower()
        on_gpu = "cuda" in lowered or "gpu" in lowered or (  # the persistent file's GPU tests name no device
            "test_persistent." in lowered and "cpu" not in lowered and not re.search(r"unavailable|_reason", lowered))
        family = family_of(test_id) if on_gpu else None
        if family is None and on_gpu and "test_persistent." in lowered:
            family = "cuda-persistent"
        if family is None:
            continue  # a CPU test, or none of the kernels
        if case.find("failure") is not None or case.find("error") is not None:
            out.append((family, "FAIL", f"pytest: {test_id}"))
        elif case.find("skipped") is None:
            out.append((family, "ok", f"pytest: {test_id}"))
    return out


def verdicts(logs: str) -> Dict[str, str]:
    stages = [line.split("\t") for line in _lines(os.path.join(logs, "stages.tsv")) if line.strip()]
    evidence: List[Evidence] = []
    problems: Dict[str, List[str]] = {f: [] for f in FAMILIES}
    for row in stages:
        name, families, status = row[0], [f for f in row[1].split(",") if f], row[2]
        log = row[4] if len(row) > 4 else ""
        found = _from_log(os.path.join(logs, log), name, families) if log else []
        evidence += found
        if status != "ok":
            failed_here = {f for f, s, _ in found if s == "FAIL"}
            for family in families:
                if family not in failed_here:
                    problems.setdefault(family, []).append(f"stage {name} {status}")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        if name.endswith(".xml"):
            evidence += _from_junit(os.path.join(logs, name))
    result = {}
    for family in FAMILIES:
        mine = [e for e in evidence if e[0] == family]
        failed = [case for _, status, case in mine if status == "FAIL"]
        passed = sum(1 for _, status, _ in mine if status == "ok")
        if failed:
            result[family] = f"FAILED ({len(failed)} failing; first: {failed[0]})"
        elif any("FAILED" in p for p in problems.get(family, [])):  # a stage failed without naming a case
            result[family] = f"FAILED ({'; '.join(problems[family])}: see its log)"
        elif problems.get(family):
            result[family] = f"unverified ({'; '.join(problems[family])}; {passed} checks passed)"
        elif passed:
            result[family] = f"verified ({passed} checks passed)"
        else:
            result[family] = "unverified (nothing ran)"
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    for family, verdict in verdicts(argv[0]).items():
        print(f"VERDICT {family:<18} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
