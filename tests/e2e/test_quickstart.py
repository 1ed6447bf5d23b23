"""examples/quickstart.py prints what the README promises, in this order: the
machine, the report, first-call times, equality, then the ratio against the
sequential compiled model before any other timing. Run in its fast mode (tiny
model, eager inner compiler): this checks the script, not the speed."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPECTED_ORDER = [
    r"machine: .+, \d+ cores, torch \S+, \d+ threads",
    r"DiagonalReport: 1 graph\(s\), 0 graph break\(s\)",
    r"first call \(Dynamo \+ passes \+ eager\): sequential \d+\.\d s, diagonal \d+\.\d s",
    r"outputs equal eager: max \|diff\| diagonal \S+, sequential \S+",
    r"batched: True",
    r"steady state, median of 1 interleaved rounds \(no_grad, batch 1\):",
    r"  diagonal vs sequential eager: \d+\.\d\dx \(> 1: diagonal faster\)   vs eager: \d+\.\d\dx",
    r"  eager +\d+\.\d\d ms",
    r"  sequential eager +\d+\.\d\d ms",
    r"  diagonal eager +\d+\.\d\d ms",
]


def test_quickstart_prints_the_ratio_against_sequential_first(tmp_path):
    picture = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--tiny", "--inner", "eager", "--rounds", "1", "--plot", str(picture)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert re.fullmatch(EXPECTED_ORDER[0], lines[0]), lines[0]
    at = 0
    for pattern in EXPECTED_ORDER[1:]:
        found = [i for i, line in enumerate(lines) if i > at and re.fullmatch(pattern, line)]
        assert found, f"no line after line {at} ({lines[at]!r}) matches {pattern!r}:\n{proc.stdout}"
        at = found[0]
    # the three timings are the last lines: nothing printed after the comparison
    assert at == len(lines) - 1
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
