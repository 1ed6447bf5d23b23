"""The backend as users meet it: entry point, options, fallbacks, verify."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.rmt import build_rmt
from diagpass.testing import assert_equivalent
from tests.helpers import analyze, dynamo_graph

SNIPPET = """
import torch, torch.nn as nn
class Cell(nn.Module):
    def __init__(self):
        super().__init__(); self.w = nn.Linear(8, 8); self.m = nn.Linear(8, 8)
    def forward(self, x, mem):
        x = x + torch.tanh(self.w(x) + mem)
        return x, mem + self.m(x).mean(1, keepdim=True)
class Net(nn.Module):
    def __init__(self):
        super().__init__(); self.layers = nn.ModuleList(Cell() for _ in range(3))
    def forward(self, x):
        mems = [torch.zeros(x.shape[0], 1, 8) for _ in self.layers]
        outs = []
        for seg in x.split(4, dim=1):
            for l, layer in enumerate(self.layers):
                seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)
torch.manual_seed(0)
net = Net()
x = torch.randn(2, 20, 8)
{prelude}
out = torch.compile(net, backend="diagonal", options={{"inner": "eager"}})(x)
torch.testing.assert_close(out, net(x))
from diagpass.counters import counters
assert counters["batch"]["cells"] > 0, dict(counters)
print("OK", counters["batch"]["cells"])
"""


@pytest.mark.parametrize("prelude", ["", "import diagpass"])
def test_backend_resolves_in_a_fresh_interpreter(prelude):
    code = textwrap.dedent(SNIPPET.format(prelude=prelude))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown option"):
        diagpass.Options.from_dict({"inner_compiler": "eager"})
    with pytest.raises(ValueError, match="inner"):
        diagpass.Options.from_dict({"inner": "tvm"})
    with pytest.raises(ValueError, match="min_group"):
        diagpass.Options.from_dict({"min_group": 1})


def test_rmt_is_refused_exactly_with_a_reason(caplog):
    model = build_rmt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, seed=0)
    ids = torch.randint(0, 128, (2, 8 * 4))
    with caplog.at_level(logging.INFO, logger="diagpass"):
        report = assert_equivalent(model, ids, options={"inner": "eager"}, expect_batched=False)
    graph = report.graphs[0]
    assert (graph.num_segments, graph.num_layers) == (4, 3)
    assert (1, -2) in graph.dependence_vectors  # layer L-1 of s -> layer 0 of s+1
    assert graph.num_wavefronts == 4 * 3  # S * L: fully sequential
    assert graph.closed_form == "L*S"
    assert "(1, 1 - L)" in graph.reason and "layer 0" in graph.reason
    assert "left sequential" in caplog.text
    explained = diagpass.explain(model, ids)
    assert not explained.batched and "1 - L" in explained.reason


def test_min_group_above_the_widest_wavefront_disables_batching():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    ids = torch.randint(0, 128, (1, 8 * 6))
    report = assert_equivalent(model, ids, options={"inner": "eager", "min_group": 4}, expect_batched=False)
    assert "4 or more" in report.graphs[0].reason


def test_verify_checks_the_first_call():
    model = build_armt("gpt2", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    ids = torch.randint(0, 128, (1, 8 * 5))
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager", "verify": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
    assert diagpass.counters["runtime"]["verified"] == 1


def test_verify_raises_on_a_wrong_rewrite(monkeypatch):
    """Sabotage the batched call: verify must catch it."""
    from diagpass.runtime.batched_cell import BatchedCell

    original = BatchedCell.forward
    monkeypatch.setattr(BatchedCell, "forward", lambda self, *a: tuple(o + 1 for o in original(self, *a)))
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager", "verify": True})
    with pytest.raises(Exception, match="verify"):
        with torch.no_grad():
            compiled(torch.randint(0, 128, (1, 8 * 5)))


def test_internal_error_falls_back(monkeypatch, caplog):
    from diagpass import pipeline

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(pipeline, "schedule", boom)
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    ids = torch.randint(0, 128, (1, 8 * 5))
    with caplog.at_level(logging.WARNING, logger="diagpass"):
        report = assert_equivalent(model, ids, options={"inner": "eager"}, expect_batched=False)
    assert "synthetic failure" in report.graphs[0].reason
    assert "internal error" in caplog.text


def test_explain_report_draws_the_grid():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    report = diagpass.explain(model, torch.randint(0, 128, (1, 8 * 5)))
    assert report.batched and report.reason is None
    assert (report.num_segments, report.num_layers) == (5, 3)
    assert report.wavefronts[2] == [(2, 0), (1, 1), (0, 2)]
    text = str(report)
    assert "S=5, layers L=3, wavefronts=7" in text
    assert "closed form L + S - 1" in text
    assert "        2  2* 3* 4*" in text  # segment 2: wavefronts 2, 3, 4, all batched


def test_warns_before_dynamo_recompile_limit(caplog):
    from tests.passes.conftest import PerLayerMemory

    model = PerLayerMemory(layers=2)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    limit = torch._dynamo.config.recompile_limit
    with caplog.at_level(logging.WARNING, logger="diagpass"), torch.no_grad():
        for segments in range(1, limit):
            x = torch.randn(1, 4 * segments, 8)
            torch.testing.assert_close(compiled(x), model(x))
    assert diagpass.counters["backend"]["recompile_limit_warnings"] >= 1
    assert "recompile_limit" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("roll", [False, True])
def test_dynamic_batch_size_still_batches(roll):
    """A second batch size makes Dynamo trace with a symbolic batch dim."""
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "roll": roll})
    with torch.no_grad():
        for batch in (1, 3, 2):
            ids = torch.randint(0, 128, (batch, 8 * 5))
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
            assert diagpass.reports()[-1].batched
    assert diagpass.counters["backend"]["graphs_fallback_error"] == 0


@pytest.mark.parametrize("tbptt", [None, 2])
def test_analyze_leaves_dynamos_graph_unchanged(tbptt):
    """The passes build a new graph; only grad_mode edits in place, on a copy
    (tbptt=2 detaches inside the model; no_grad regions are covered in
    tests/passes/test_grad_mode.py)."""
    from diagpass import Options

    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    gm, _ = dynamo_graph(model, torch.randint(0, 128, (1, 8 * 6)), detach_every=tbptt)
    before = gm.code
    rewritten, report = analyze(gm, Options(inner="eager"))
    assert report.batched and rewritten is not gm
    assert gm.code == before


def test_steady_state_groups_share_one_module_and_one_fake_trace():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    ids = torch.randint(0, 128, (1, 8 * 9))
    assert_equivalent(model, ids, options={"inner": "eager"}, expect_batched=True)
    c = diagpass.counters
    # S=9, L=3: middle-segment groups of 3 cells at t=3..8 (plus ramps): one
    # module per (structure, size), far fewer than groups.
    assert c["batch"]["groups"] >= 7
    assert c["batch"]["modules"] <= 4
    assert c["check"]["fake_check_reused_traces"] >= c["batch"]["groups"] - c["batch"]["modules"]


def test_rewritten_graph_compiles_with_memory_config_and_baseline_with_stock_inductor(monkeypatch):
    """Inductor's reorder_for_locality moved every segment's lm_head to the end, keeping each
    batched group's output buffer alive, and its stock realize threshold recomputed batched
    residual sums from three live inputs (see backend.REWRITTEN_INDUCTOR_CONFIG); the
    sequential baseline keeps stock Inductor."""
    import torch._inductor.compile_fx as compile_fx_module

    patches = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8, seed=1)
    randomize_memory_(model)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    # the batched graph compiles one step per distinct wavefront (wavefront_steps), each with the
    # config, and on the CPU with the C++ wrapper (runtime/inner.CPP_WRAPPER_CONFIG); a step
    # compiled for symbolic widths also without the FX graph cache (runtime/inner.py)
    rewritten = {"reorder_for_locality": False, "realize_reads_threshold": 2, "cpp_wrapper": True}
    width_free = {**rewritten, "fx_graph_cache": False}
    # S=5, L=3: the first three wavefronts, the group call alone, the last cell, the entering and the leaving glue
    for options, expected, compiles in (({"cost_model": False}, rewritten, 7), ({"enabled": False}, None, 1)):
        torch._dynamo.reset()
        patches.clear()
        before = diagpass.counters["wavefront_steps"]["steps_width_free"]
        with torch.no_grad():
            torch.compile(model, backend="diagonal", options={"inner": "inductor", **options})(ids)
        symbolic = diagpass.counters["wavefront_steps"]["steps_width_free"] - before
        assert (symbolic > 0) == (expected is not None)
        assert sorted(patches, key=lambda p: bool(p and "fx_graph_cache" in p)) == [expected] * (compiles - symbolic) + [width_free] * symbolic
