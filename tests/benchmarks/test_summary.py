"""benchmarks.summary: the defaults' row of every point from benchmark JSON (no compile)."""
import json

from benchmarks import summary


def _mode(ms, peak=None, first=None, diag=None):
    m = {"median_ms": ms, "samples_ms": [ms] * 3, "first_call_s": first}
    if peak is not None:
        m["tensor_peak_mb"] = peak
    if diag is not None:
        m["diag"] = diag
    return m


def _write(tmp_path, name, results):
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {"threads": 2, "date": "2026-12-06T11:00:00"}, "results": results}))
    return str(path)


def test_rows_read_the_defaults_against_sequential_inductor(tmp_path):
    memory_rule = {"batched": False, "reason": "memory: stacking the layer weights per call would raise ..."}
    fast = {"label": "a S=16", "modes": {"inductor": _mode(100.0, 20.0, 90.0), "bound": _mode(60.0),
                                         "diagonal": _mode(95.0, 19.0, 40.0, memory_rule)}}
    slow = {"label": "b S=64", "modes": {"inductor": _mode(100.0, 20.0), "diagonal": _mode(100.1, 23.0, None,
                                                                                           {"batched": True})}}
    unmeasured = {"label": "c", "modes": {"inductor": _mode(1.0), "diagonal": {"error": "boom"}}}
    rows = summary.rows(_write(tmp_path, "r.json", [fast, slow, unmeasured]), "diagonal")
    assert [r["label"] for r in rows] == ["a S=16", "b S=64"]  # a failed mode has no row
    a, b = rows
    assert abs(a["speedup"] - 100 / 95) < 1e-12 and abs(a["paired"] - 100 / 95) < 1e-12
    assert abs(a["share"] - 5 / 40) < 1e-12 and abs(a["peak"] - 0.95) < 1e-12
    assert a["ran"] == "sequential (memory rule)" and b["ran"] == "batched"
    assert b["share"] is None and b["bound"] is None
    text = summary.markdown(rows)
    assert "**1.053x** (1.053x)" in text and "**0.999x**" in text  # parity is not rounded up to 1.00x
    assert text.splitlines()[-1] == ("2 rows: defaults >= 1.0x sequential Inductor (median) on 1; "
                                     "peak tensors <= 1.1x on 1 of the 2 with memory measured")
