"""torch.compile conventions: TORCH_LOGS="diagpass", structured traces, one-line
fallbacks, recompile warnings that name the guard, diagpass.testing without hypothesis."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import diagpass
from diagpass import logs
from tests.passes.conftest import MemLayer, PerLayerMemory

# A 5-segment x 3-layer per-layer-memory model compiled with the eager inner
# compiler: the backend's analysis runs, nothing slow does.
TINY = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.passes.conftest import PerLayerMemory
    torch.manual_seed(0)
    net = PerLayerMemory(layers=3)
    x = torch.randn(2, 20, 8)
    with torch.no_grad():
        out = torch.compile(net, backend="diagonal", options={{"inner": "eager"}})(x)
        torch.testing.assert_close(out, net(x))
    print("matplotlib imported:", "matplotlib" in sys.modules)
    print("OK")
""")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    for name in ("TORCH_LOGS", "TORCH_TRACE"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=full_env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _info_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("I") and "diagpass: graph" in line]


def test_torch_logs_diagpass_gives_the_report_at_info():
    proc = _run(TINY.format(root=ROOT), TORCH_LOGS="diagpass")
    lines = _info_lines(proc.stderr)
    text = "\n".join(lines)
    assert "5 segments x 3 layers = 15 cells, 7 wavefronts (closed form L + S - 1), 7 groups" in text
    assert "groups per wavefront (cells in each, * = batched): 1 | 2* | 3* | 3* | 3* | 2* | 1" in text
    assert "batched: 5 groups, 13 cells" in text
    assert "2 groups run cell by cell: fewer than min_group=2" in text
    assert "cost: copying" in text
    assert "timings: passes" in text and "inner" in text
    assert "[0/0]" in lines[0]  # torch's prefix: the compile id
    assert "cell -> wavefront" not in proc.stderr  # the grid is DEBUG
    assert "matplotlib imported: False" in proc.stdout  # plot's import is lazy


def test_plus_diagpass_adds_the_grid_and_the_rewritten_code_at_debug():
    proc = _run(TINY.format(root=ROOT), TORCH_LOGS="+diagpass")
    assert "cell -> wavefront (* = batched):" in proc.stderr
    assert "        2  2* 3* 4*" in proc.stderr  # segment 2's row of the grid
    assert "[__diagpass_graph_code]" in proc.stderr and "diag_t" in proc.stderr


def test_graph_code_artifact_alone_after_diagpass():
    proc = _run(TINY.format(root=ROOT), TORCH_LOGS="diagpass,diagpass_graph_code")
    assert "[__diagpass_graph_code]" in proc.stderr and "diag_t" in proc.stderr
    assert "cell -> wavefront" not in proc.stderr  # only the artifact is at debug


def test_torch_logs_help_lists_diagpass():
    from torch._logging._internal import log_registry

    assert log_registry.is_log("diagpass") and log_registry.is_artifact("diagpass_graph_code")


def test_structured_trace_has_the_report_and_the_rewritten_code(tmp_path):
    _run(TINY.format(root=ROOT), TORCH_TRACE=str(tmp_path))
    text = "".join(p.read_text() for p in tmp_path.iterdir())
    records = {}
    for line in text.splitlines():
        if '"artifact"' in line:
            meta = json.loads(line[line.index("{"):])
            records[meta["artifact"]["name"]] = meta
    assert {"diagpass_report", "diagpass_report_json", "diagpass_graph_code"} <= set(records)
    assert records["diagpass_report"]["frame_compile_id"] == 0  # attached to compile 0/0
    assert "seg\\layer" in text and "2* 3* 4*" in text  # the grid, in the payload
    assert '"batched": true' in text and "diag_t" in text


# --- fallbacks: one line naming the cause ------------------------------------


class _WritesIntoALocalBuffer(MemLayer):
    """``buf.copy_(batched value)`` on a buffer the cell creates: under vmap the
    buffer is unbatched, so the batched call cannot trace and the graph falls
    back. FX printed the generated code around the failing line to stderr."""

    def forward(self, x, mem):
        h = self.w(x)
        buf = torch.zeros(h.shape[-1])
        buf.copy_(h[0, 0])
        x = x + torch.tanh(h + buf + mem)
        return x, mem + self.m(x).mean(1, keepdim=True)


class _AddsIntoALocalBuffer(MemLayer):
    """``buf.add_(batched)``: the fake-tensor meta kernel fails, and
    FakeTensorMode logged that failure's traceback at ERROR."""

    def forward(self, x, mem):
        h = self.w(x)
        buf = torch.zeros(h.shape[-1])
        buf.add_(h.sum((0, 1)))
        x = x + torch.tanh(h + buf + mem)
        return x, mem + self.m(x).mean(1, keepdim=True)


@pytest.mark.parametrize("layer", [_WritesIntoALocalBuffer, _AddsIntoALocalBuffer])
def test_a_vmap_fallback_is_one_line_at_info(layer, capfd, caplog):
    torch.manual_seed(0)
    model = PerLayerMemory(layers=3)
    model.layers = torch.nn.ModuleList(layer() for _ in range(3))
    x = torch.randn(1, 4 * 6, 8)
    with caplog.at_level(logging.INFO, logger="diagpass"), torch.no_grad():
        out = torch.compile(model, backend="diagonal", options={"inner": "eager"})(x)
        torch.testing.assert_close(out, model(x))
    report = diagpass.reports()[-1]
    assert not report.batched and report.reason.startswith("the batched graph does not trace (RuntimeError: ")
    assert "\n" not in report.reason and "While executing" not in report.reason
    err = capfd.readouterr().err
    for noise in ("Traceback", "<--- HERE", "While executing", "failed while attempting to run meta"):
        assert noise not in err and noise not in caplog.text, noise
    causes = [r for r in caplog.records if "does not trace" in r.getMessage()]
    assert len(causes) == 1 and causes[0].levelno == logging.INFO and causes[0].exc_info is None


def test_a_vmap_fallback_traceback_is_kept_at_debug(caplog):
    torch.manual_seed(0)
    model = PerLayerMemory(layers=3)
    model.layers = torch.nn.ModuleList(_WritesIntoALocalBuffer() for _ in range(3))
    with caplog.at_level(logging.DEBUG, logger="diagpass"), torch.no_grad():
        torch.compile(model, backend="diagonal", options={"inner": "eager"})(torch.randn(1, 24, 8))
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "<--- HERE" in debug  # FX's generated-code context, moved from stderr to DEBUG
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


def test_quiet_trial_passes_output_through_when_the_trial_succeeds(capsys, caplog):
    with logs.quiet_trial("a trial"):
        print("kept", file=sys.stderr)
    assert capsys.readouterr().err == "kept\n"
    with caplog.at_level(logging.DEBUG, logger="diagpass"), pytest.raises(ValueError):
        with logs.quiet_trial("a trial"):
            print("moved to debug", file=sys.stderr)
            raise ValueError("no")
    assert capsys.readouterr().err == ""
    assert "a trial failed" in caplog.text and "moved to debug" in caplog.text


def test_first_line_drops_what_fx_appends():
    e = RuntimeError("the cause\n\nWhile executing %x\nOriginal traceback:\nNone")
    assert logs.first_line(e) == "RuntimeError: the cause"


# --- recompiles -----------------------------------------------------------------


class _WithMode(PerLayerMemory):
    """Recompiles on a string argument (Dynamo guards its value), not on length."""

    def forward(self, x, mode: str):
        return super().forward(x) * len(mode)


def test_recompile_warning_names_the_guard_that_failed(caplog):
    model = _WithMode(layers=2)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    x = torch.randn(1, 4 * 3, 8)  # one segment count throughout
    with torch._dynamo.config.patch(recompile_limit=4), caplog.at_level(logging.WARNING, logger="diagpass"), \
            torch.no_grad():
        for mode in ("a", "bb", "ccc"):
            torch.testing.assert_close(compiled(x, mode), model(x, mode))
    warnings = [r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert len(warnings) == 1  # compile 3 of 4: one before the limit
    assert "the guard that failed: 0/1: mode == 'bb'" in warnings[0]
    assert [r.recompile_reason for r in diagpass.reports()[-3:]][0] is None
    assert diagpass.reports()[-1].recompile_reason.startswith("0/1: mode == 'bb'")


def test_recompile_warning_on_segment_count_names_the_size_guard(caplog):
    model = PerLayerMemory(layers=2)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    with torch._dynamo.config.patch(recompile_limit=4), caplog.at_level(logging.WARNING, logger="diagpass"), \
            torch.no_grad():
        for segments in (1, 2, 3):
            compiled(torch.randn(1, 4 * segments, 8))
    warning = next(r.getMessage() for r in caplog.records if "recompile_limit" in r.getMessage())
    assert "x.size()[1]" in warning  # the split's guard on the number of segments


# --- diagpass.testing without hypothesis -------------------------------------------


def test_testing_imports_without_hypothesis():
    code = textwrap.dedent("""
        import sys
        sys.modules["hypothesis"] = None  # any `import hypothesis` now fails
        import diagpass.testing
        from diagpass.testing import assert_equivalent
        import diagpass.testing_strategies as ts
        assert ts.DTYPE_TOLERANCES and ts.expected_batching
        try:
            ts.rmt_models()
        except ImportError as e:
            assert "hypothesis" in str(e)
        else:
            raise AssertionError("rmt_models() without hypothesis should say it needs it")
        print("OK")
    """)
    assert _run(code).stdout.strip() == "OK"
