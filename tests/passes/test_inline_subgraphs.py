import pytest
import torch

import diagpass
from diagpass import Options
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.passes.inline_subgraphs import has_subgraph_calls, inline_subgraphs
from diagpass.testing import assert_equivalent

from tests.helpers import analyze, dynamo_graph

from .conftest import PerLayerMemory
from .graph_text import render


def _capture(model, *args):
    return dynamo_graph(model, *args)[0]


def _ops(gm):
    return [n.target.__name__ if callable(n.target) else n.target
            for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


# two segments x two layers: four calls of one traced body
GOLDEN_BEFORE = ["split", "getitem", "getitem",
                 "invoke_subgraph", "getitem", "getitem", "invoke_subgraph", "getitem", "getitem",
                 "invoke_subgraph", "getitem", "invoke_subgraph", "getitem", "cat"]
# one MemLayer body = linear, add, tanh, add, linear, mean, add
GOLDEN_AFTER = ["split", "getitem", "getitem"] + ["linear", "add", "tanh", "add", "linear", "mean", "add"] * 4 + ["cat"]


def test_inline_golden_and_meta():
    model = PerLayerMemory(layers=2)
    diagpass.mark_compile_regions(model.layers)
    x = torch.randn(1, 8, 8)
    gm = _capture(model, x)
    ops = [o for o in _ops(gm) if o not in ("zeros",)]
    assert ops == GOLDEN_BEFORE
    inputs = [x, *model.parameters()]  # placeholders: the input, then the lifted weights
    expected = gm(*inputs)
    assert inline_subgraphs(gm) == 4
    assert not has_subgraph_calls(gm)
    assert [o for o in _ops(gm) if o not in ("zeros",)] == GOLDEN_AFTER
    assert not gm.graph.find_nodes(op="get_attr")
    torch.testing.assert_close(gm(*inputs), expected)
    # every inlined node is attributed to its own call site's layer (the body
    # itself was traced at layer 0's call)
    from diagpass.fx_facts import module_paths

    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    layer_of_weight = [int(n.args[1].name.split("layers_modules_")[1][0]) for n in linears]
    layer_of_stack = [int(module_paths(n)[-1].split("layers.")[1][0]) for n in linears]
    assert layer_of_weight == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layer_of_stack == layer_of_weight
    assert len({n.meta["diagpass_region"] for n in linears}) == 4


# one segment x two layers: the layer body traced once (subgraph_0), called
# twice; each call reads its own layer's weights
GOLDEN_TEXT_BEFORE = """\
zeros = zeros(1, 1, 8)
zeros_1 = zeros(1, 1, 8)
split = .split(l_x_, 4, dim=1)
seg = getitem(split, 0)
subgraph_0 = get_attr:subgraph_0()
invoke_subgraph = invoke_subgraph(subgraph_0, 'subgraph_0', seg, layers.0.w.weight, layers.0.w.bias, zeros, layers.0.m.weight, layers.0.m.bias)
getitem_5 = getitem(invoke_subgraph, 0)
subgraph_1 = get_attr:subgraph_0()
invoke_subgraph_1 = invoke_subgraph(subgraph_1, 'subgraph_0', getitem_5, layers.1.w.weight, layers.1.w.bias, zeros_1, layers.1.m.weight, layers.1.m.bias)
getitem_6 = getitem(invoke_subgraph_1, 0)
cat = cat([getitem_6], 1)
return (cat,)"""

# the body in place of each call, on that call's operands; the getitems of
# the calls are gone (cat reads the second body's output directly). The memory
# update (mean, add) is dead here, as in the body: one segment writes no memory
# that anything reads.
GOLDEN_TEXT_AFTER = """\
zeros = zeros(1, 1, 8)
zeros_1 = zeros(1, 1, 8)
split = .split(l_x_, 4, dim=1)
seg = getitem(split, 0)
linear = linear(seg, layers.0.w.weight, layers.0.w.bias)
add = add(linear, zeros)
tanh = tanh(add)
x = add(seg, tanh)
linear_1 = linear(x, layers.0.m.weight, layers.0.m.bias)
mean = .mean(linear_1, 1, keepdim=True)
add_2 = add(zeros, mean)
linear_2 = linear(x, layers.1.w.weight, layers.1.w.bias)
add_3 = add(linear_2, zeros_1)
tanh_1 = tanh(add_3)
x_1 = add(x, tanh_1)
linear_3 = linear(x_1, layers.1.m.weight, layers.1.m.bias)
mean_1 = .mean(linear_3, 1, keepdim=True)
add_4 = add(zeros_1, mean_1)
cat = cat([x_1], 1)
return (cat,)"""


def test_inline_golden_text():
    model = PerLayerMemory(layers=2)
    diagpass.mark_compile_regions(model.layers)
    x = torch.randn(1, 4, 8)
    gm, inputs = dynamo_graph(model, x)
    assert render(gm) == GOLDEN_TEXT_BEFORE
    with torch.no_grad():
        expected = gm(*inputs)
    assert inline_subgraphs(gm) == 2
    assert render(gm) == GOLDEN_TEXT_AFTER
    assert diagpass.counters["inline_subgraphs"]["calls"] == 2
    gm.graph.lint()
    assert not gm.graph.find_nodes(op="get_attr")  # the body modules are no longer read
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)


def test_marked_armt_batches_exactly_as_unmarked():
    ids = torch.randint(0, 128, (1, 8 * 6))
    plain = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(plain)
    marked = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    marked.load_state_dict(plain.state_dict())
    assert diagpass.mark_compile_regions(layer.layer for layer in marked.layers) == 3

    expected = assert_equivalent(plain, ids, options={"inner": "eager"}, expect_batched=True).graphs[0]
    diagpass.counters.clear()
    got = assert_equivalent(marked, ids, options={"inner": "eager"}, expect_batched=True).graphs[0]
    assert diagpass.counters["inline_subgraphs"]["calls"] == 6 * 3
    assert got.groups == expected.groups
    assert got.batched_groups == expected.batched_groups


@pytest.mark.slow
def test_marked_armt_gradients_through_aot():
    model = build_armt("gpt2", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    diagpass.mark_compile_regions(layer.layer for layer in model.layers)
    ids = torch.randint(0, 128, (2, 8 * 5))
    assert_equivalent(model, ids, options={"inner": "aot_eager"}, grads=True, expect_batched=True)
    assert diagpass.counters["inline_subgraphs"]["calls"] == 5 * 3


def test_analyze_leaves_the_marked_graph_for_the_fallback():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    diagpass.mark_compile_regions(layer.layer for layer in model.layers)
    gm = _capture(model, torch.randint(0, 128, (1, 8 * 5)))
    before = gm.code
    rewritten, report = analyze(gm, Options(inner="eager"))
    assert report.batched
    assert gm.code == before and has_subgraph_calls(gm)


def test_marking_is_per_instance_and_idempotent():
    a, b = PerLayerMemory(layers=2), PerLayerMemory(layers=2)
    assert diagpass.mark_compile_regions(a.layers) == 2
    assert diagpass.mark_compile_regions(a.layers) == 0
    assert type(b.layers[0]) is not type(a.layers[0])
    assert type(a.layers[0]).__name__ == type(b.layers[0]).__name__
    assert isinstance(a.layers[0], type(b.layers[0]))
