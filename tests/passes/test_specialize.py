"""passes/specialize: a dynamic graph made the static graph of one call's sizes. The
size arithmetic folds into constants (golden text), the result computes what Dynamo's
graph computes, and sizes that break the graph's own relations are refused."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import diagpass
from diagpass.errors import NotBatchable
from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.passes.specialize import concrete, specialize, symbolic_sizes
from tests.helpers import dynamo_graphs
from tests.passes.graph_text import render


def _last_piece(x):
    n = x.shape[1] // 4
    last = x[:, 4 * (n - 1):]
    return last * 2, x.sum(1)


def _graphs(fn, *shapes):
    """Dynamo's graph (and example inputs) for each call's shape: from the second on dynamic."""
    return dynamo_graphs(fn, *[(torch.randn(*shape),) for shape in shapes])


DYNAMIC = """\
input s27
input l_x_
floordiv = floordiv(s27, 4)
sub = sub(floordiv, 1)
mul = mul(4, sub)
last = getitem(l_x_, (:, mul:))
mul_1 = mul(last, 2)
sum_1 = .sum(l_x_, 1)
return (mul_1, sum_1)"""

STATIC_28 = """\
input s27
input l_x_
last = getitem(l_x_, (:, 24:))
mul_1 = mul(last, 2)
sum_1 = .sum(l_x_, 1)
return (mul_1, sum_1)"""


def test_size_arithmetic_folds_into_the_slice_and_the_graph_computes_the_same():
    (static, _), (gm, example_inputs) = _graphs(_last_piece, (2, 12), (2, 20))
    assert symbolic_sizes(static) is None
    assert render(gm, placeholders=True) == DYNAMIC.replace("s27", gm.graph.find_nodes(op="placeholder")[0].name)
    sizes = symbolic_sizes(gm)
    assert len(sizes.sources) == 1 and sizes.sources[0][1] == (0, "int", 0)  # read from the int input
    assert sizes.read(example_inputs) == (20,)
    x = torch.randn(2, 28)
    out = specialize(gm, sizes, [28, x])
    assert render(out, placeholders=True) == STATIC_28.replace("s27", out.graph.find_nodes(op="placeholder")[0].name)
    torch.testing.assert_close(out(28, x), gm(28, x), rtol=0, atol=0)
    assert gm.code != out.code and "floordiv" in gm.code  # Dynamo's graph is left as it was
    ph = out.graph.find_nodes(op="placeholder")[1]
    assert tuple(ph.meta["example_value"].shape) == (2, 28)  # values are the static ones


def test_sizes_that_break_the_graphs_relations_are_refused():
    _, (gm, _) = _graphs(_last_piece, (2, 12), (2, 20))
    with pytest.raises(NotBatchable, match="size is 28, not .* = 30"):
        specialize(gm, symbolic_sizes(gm), [30, torch.randn(2, 28)])


def test_example_inputs_are_read_as_the_call_passes_them():
    _, (gm, example_inputs) = _graphs(_last_piece, (2, 12), (2, 20))
    assert isinstance(example_inputs[0], torch.SymInt)  # Dynamo's symbolic length
    assert concrete(example_inputs)[0] == 20 and concrete(example_inputs)[1] is example_inputs[1]


def test_an_in_place_write_through_a_view_keeps_its_values():
    """The static values come from running Dynamo's own ops in Dynamo's order: a view
    written in place stays a view of its base (the later read sees the write)."""
    def fn(x):
        y = x.clone()
        y[:, x.shape[1] - 4:].mul_(3)
        return y + 1

    _, (gm, example_inputs) = _graphs(fn, (2, 8), (2, 12))
    x = torch.randn(2, 16)
    args = [16 if isinstance(a, torch.SymInt) else x for a in example_inputs]
    out = specialize(gm, symbolic_sizes(gm), args)
    torch.testing.assert_close(out(*args)[0], fn(x), rtol=0, atol=0)
    assert "sub" not in out.code and "sub" in gm.code  # the view's start is a constant now


def _metadata(gm):
    """Every node's values as the passes read them: sizes, strides, offset, dtype, grad, version
    counter, and which earlier value (node, leaf) first had its storage."""
    first, out = {}, []
    for n in gm.graph.nodes:
        for k, v in enumerate(torch.utils._pytree.tree_leaves(n.meta.get("example_value"))):
            if isinstance(v, torch.Tensor):
                owner = first.setdefault(StorageWeakRef(v.untyped_storage()), (n.name, k))
                out.append((n.name, k, tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.requires_grad,
                            v._version, owner))
            else:
                out.append((n.name, k, v))
    return out


def _writes(x):
    y = x.clone()
    head = y.view(-1)[:4]  # static sizes, a view of a value whose sizes change: runs again
    head.mul_(3)
    buf = torch.zeros(2, 32)  # kept: Dynamo's value; the write below (it runs again) must not bump it twice
    buf[:, :x.shape[1]] = x
    return y + 1, head * 2, buf


@pytest.mark.parametrize("form", ["writes", "family_stacked"])
def test_only_the_values_that_change_run_again_and_they_come_out_as_the_whole_run(form):
    """Dynamo's values that no size changes are kept (views of a value that changes run
    again, to stay its views); the graph's values, their aliasing and their version counters
    (the write analysis reads them) are those of running the whole graph again."""
    if form == "writes":
        graphs, x = _graphs(_writes, (2, 8), (2, 12)), torch.randn(2, 16)
    else:
        model = build_family_model(FamilyConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, segment_size=4,
                                                num_mem_tokens=2, memory_kind="associative"), seed=0).eval()
        diagpass.stack_weights_(model.layers)  # parameters are views of a stack, their fakes' counters bumped
        graphs = dynamo_graphs(model, (torch.randint(0, 64, (1, 12)),), (torch.randint(0, 64, (1, 20)),))
        x = torch.randint(0, 64, (1, 18))  # five segments as the second call, the last one shorter
    _, (gm, example_inputs) = graphs
    args = [x.shape[1] if isinstance(a, torch.SymInt) else  # the length; the input, longer than both calls'
            x if isinstance(a, torch.Tensor) and a.dim() == x.dim() and a.dtype == x.dtype and a.shape[0] == x.shape[0] else a
            for a in example_inputs]
    assert sum(a is x for a in args) == 1
    mark = dict(diagpass.counters["specialize"])
    with torch.no_grad():  # the grad mode Dynamo traced under (it guards it): the backend's at the call
        partial = specialize(gm, symbolic_sizes(gm), args)
    c = diagpass.counters["specialize"]
    assert c["graphs_run_whole"] == mark.get("graphs_run_whole", 0)
    again, kept = (c[k] - mark.get(k, 0) for k in ("nodes_run_again", "nodes_kept"))
    assert again > 0 and (form == "writes" or again < kept)  # the model: a few slices of the input, the output
    with torch.no_grad():
        whole = specialize(gm, symbolic_sizes(gm), args, whole=True)
    assert _metadata(partial) == _metadata(whole)
    torch.testing.assert_close(partial(*args), whole(*args), rtol=0, atol=0)
