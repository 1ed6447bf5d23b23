"""benchmarks.gpu: the CPU dry run exercises every step and writes honest output; the budget
skips what would not fit. (The dry run's numbers are a smoke test, not results.)"""
import json

import pytest

from benchmarks import gpu


def test_budget_skips_a_point_that_would_not_fit():
    b = gpu.Budget(100.0)
    assert b.estimate(cells=10, tokens=100, calls=5) is None  # nothing measured: run it
    b.learn(cells=10, compile_s=20.0, tokens=100, call_s=0.5)
    assert b.estimate(cells=40, tokens=400, calls=5) == pytest.approx(2.0 * 40 + 0.005 * 400 * 5)


def test_markdown_lists_skips_and_marks_a_dry_run():
    result = {"meta": {"date": "d", "torch": "t", "device_name": "cpu", "inner": "aot_eager", "budget_s": 1.0,
                       "total_s": 1.0, "command": "c", "dry_run": True, "num_mem_tokens": 2},
              "checks": [{"check": "fp32 diagonal vs eager", "passed": True}],
              "points": [], "skipped": [{"tokens": 131072, "segment": 512, "reason": "estimated 900 s > 10 s left"}]}
    md = gpu.markdown(result)
    assert "DRY RUN" in md and "skipped: estimated 900 s" in md and "| fp32 diagonal vs eager | True |" in md


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The CI command: checks pass (and the diagonal graph was batched: a check that did not
    batch compares nothing), every point timed or skipped with a reason, kernels honestly
    n/a under aot_eager, JSON and markdown written."""
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["meta"]["dry_run"] and len(res["checks"]) == 2
    assert all(c["passed"] and c["batched"] for c in res["checks"])
    assert len(res["points"]) + len(res["skipped"]) == 2 and res["points"]
    p = res["points"][0]
    assert set(p["modes"]) == {"seq", "diagonal", "base"} and p["modes"]["diagonal"]["batched"]
    for m in p["modes"].values():
        assert len(m["samples_ms"]) == 2 and m["median_ms"] > 0
        assert m["kernels"]["generated_kernels"] is None and "n/a" in m["kernels"]["note"]
    assert p["diag_vs_seq_max_abs"] < 0.1
    assert "DRY RUN" in (tmp_path / "gpu.md").read_text()
