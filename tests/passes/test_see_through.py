"""see_through.simplify_concat_slices: a read of exactly one piece of a cat (or one
element of a stack) becomes the piece; everything else is left alone. Each test
checks the count, that the graph still computes the model's output, and where a
rewrite happened that the read really reads the piece now."""

import operator

import pytest
import torch
import torch.nn as nn

import diagpass
from diagpass.passes.see_through import simplify_concat_slices
from tests.helpers import dynamo_graph, dynamo_graphs
from tests.passes.conftest import capture


def _rewrite(fn, *args):
    """(count, gm) after the pass on Dynamo's graph of ``fn``; the rewritten graph
    must still compute what ``fn`` computes."""
    gm = capture(_Fn(fn), *args)
    count = simplify_concat_slices(gm)
    _assert_computes(gm, fn, *args)
    return count, gm


def _assert_computes(gm, fn, *args, params=()):
    """Same values elementwise; a reduction over the piece may round differently
    than over the strided view (another summation order), hence not rtol=0.
    Dynamo's graph returns its outputs as a flat tuple."""
    want = fn(*args)
    want = tuple(want) if isinstance(want, tuple) else (want,)
    torch.testing.assert_close(tuple(gm(*params, *args) if params else gm(*args)), want, rtol=1e-6, atol=1e-6)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _targets(gm):
    return [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_slice_of_cat_is_the_piece_and_the_dead_cat_goes():
    def f(a, b, c):
        h = torch.cat([a.tanh(), b.tanh(), c.tanh()], 1)
        return h[:, 4:6] * 2

    args = (torch.randn(2, 4, 3), torch.randn(2, 2, 3), torch.randn(2, 5, 3))
    count, gm = _rewrite(f, *args)
    assert count == 1 and diagpass.counters["see_through"]["slices"] == 1
    assert "cat" not in _targets(gm) and "getitem" not in _targets(gm)
    mul = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "mul")
    assert getattr(mul.args[0].target, "__name__", mul.args[0].target) == "tanh"


_NOT_ONE_PIECE = {
    "straddles": lambda g: g[:, 3:6],
    "part_of_a_piece": lambda g: g[:, 0:2],
    "two_pieces": lambda g: g[:, 0:],
    "strided": lambda g: g[:, ::2],
    "other_dim": lambda g: g[:1, 4:],
}


@pytest.mark.parametrize("name", sorted(_NOT_ONE_PIECE))
def test_ranges_that_are_not_one_piece_are_left(name):
    read = _NOT_ONE_PIECE[name]

    def f(a, b):
        return read(torch.cat([a * 1, b * 1], 1)) + 1

    count, _ = _rewrite(f, torch.randn(2, 4, 3), torch.randn(2, 2, 3))
    assert count == 0


def test_negative_bounds_trailing_ellipsis_narrow_and_split():
    def f(a, b, c):
        h = torch.cat([a * 1, b * 1, c * 1], -2)
        return h[:, -3:, ...] + 1, h.narrow(1, 2, 4).sum(), h.split(2, 1)[0] * 3, h.split([2, 4, 3], dim=1)[1] * 4

    count, gm = _rewrite(f, torch.randn(2, 2, 3), torch.randn(2, 4, 3), torch.randn(2, 3, 3))
    assert count == 4 and "cat" not in _targets(gm)


def test_layer_major_loop_reads_pieces_of_the_previous_layer():
    """The ARMT 'horizontal' shape: each layer loops over segments and cats; the next
    layer slices the cat again. After the pass no layer reads a cat."""

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, h):
            mem, outs = torch.zeros(h.shape[0], 1, 8), []
            for start in range(0, h.shape[1], 4):
                x = h[:, start : start + 4]
                x = x + torch.tanh(self.w(x) + mem)
                mem = mem + x.mean(1, keepdim=True)
                outs.append(x)
            return torch.cat(outs, 1)

    model = nn.Sequential(Layer(), Layer(), Layer())
    x = torch.randn(2, 12, 8)
    gm, inputs = dynamo_graph(model, x)
    assert simplify_concat_slices(gm) == 6  # layers 1 and 2, three segments each
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], model(x), rtol=1e-6, atol=1e-6)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 1 and all(u.op == "output" for u in cats[0].users)  # only the model's output


_STACK_READS = {
    "getitem": (0, lambda s: s[1]),
    "negative": (0, lambda s: s[-1]),
    "select": (0, lambda s: s.select(0, 1)),
    "unbind": (0, lambda s: torch.unbind(s)[1]),
    "getitem_dim1": (1, lambda s: s[:, 1]),
    "select_dim1": (1, lambda s: s.select(1, 1)),
    "unbind_dim1": (1, lambda s: s.unbind(1)[1]),
    "negative_dim": (-2, lambda s: s[:, 1]),
}


@pytest.mark.parametrize("name", sorted(_STACK_READS))
def test_element_of_a_stack_is_the_element(name):
    dim, read = _STACK_READS[name]

    def f(a, b):
        return read(torch.stack([a.exp(), b.exp()], dim)) * 2

    count, gm = _rewrite(f, torch.randn(3, 4), torch.randn(3, 4))
    assert count == 1 and diagpass.counters["see_through"]["selects"] == 1
    assert "stack" not in _targets(gm)


def test_stack_read_at_another_dim_is_left():
    def f(a, b):
        return torch.stack([a.exp(), b.exp()], 1)[1] * 2

    count, _ = _rewrite(f, torch.randn(3, 4), torch.randn(3, 4))
    assert count == 0


def test_a_read_returned_as_output_is_left():
    def f(a, b):
        h = torch.cat([a * 1, b * 1], 1)
        return h[:, :4]

    count, _ = _rewrite(f, torch.randn(2, 4), torch.randn(2, 3))
    assert count == 0


def test_in_place_users_block_the_rewrite():
    """A write into the slice writes the cat's storage; into the piece it would not."""

    def f(a, b):
        h = torch.cat([a * 1, b * 1], 1)
        v = h[:, :4]
        v.mul_(2)
        return h + 1

    gm = capture(_Fn(f), torch.randn(2, 4), torch.randn(2, 3))
    assert simplify_concat_slices(gm) == 0


def test_non_contiguous_piece_with_other_strides_is_left():
    """The slice of a (contiguous) cat allows views the transposed piece does not."""

    def f(a, b):
        h = torch.cat([a.transpose(0, 1), b * 1], 0)
        return h[:3].reshape(-1) + 1

    count, _ = _rewrite(f, torch.randn(4, 3), torch.randn(2, 4))
    assert count == 0


def test_no_cat_no_rewrite_and_graph_untouched():
    def f(a):
        return a[:, :2] * 2

    gm = capture(_Fn(f), torch.randn(2, 4))
    before = str(gm.graph)
    assert simplify_concat_slices(gm) == 0 and str(gm.graph) == before


def test_a_dynamic_graphs_symbolic_last_piece_is_seen_through_too():
    """A second segment count: Dynamo recompiles with the length symbolic, so the last
    segment's piece has a symbolic size and its read a symbolic end (``x[:, 70:s + 16]``).
    Offsets before it are known and the end equals the cat's length for every value of
    ``s``: every read of a layer's cat becomes its piece, the last one too (left as a
    read of the whole cat, each segment would depend on every other)."""
    from diagpass.models.family import FamilyConfig, build_family_model

    cfg = FamilyConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind="associative", layer_major=True)
    model = build_family_model(cfg, seed=0).eval()
    graphs = dynamo_graphs(model, *[(torch.randint(0, 64, (1, 8 * S)),) for S in (5, 8)])
    gm, inputs = graphs[-1]
    assert any(isinstance(a, torch.SymInt) for a in inputs)  # the length is a symbolic input
    inputs = [a.node.hint if isinstance(a, torch.SymInt) else a for a in inputs]  # this call's value
    ids = next(a for a in inputs if isinstance(a, torch.Tensor) and a.dtype == torch.long)
    with torch.no_grad():
        want = gm(*inputs)
    def cat_reads():
        return [u for n in gm.graph.nodes if n.target is torch.cat for u in n.users if u.target is operator.getitem]

    reads = len(cat_reads())
    assert reads >= 2 * 8  # layers 1 and 2 read each of the 8 pieces of the layer before
    assert simplify_concat_slices(gm) == reads and not cat_reads()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), want, rtol=0, atol=0)
        torch.testing.assert_close(gm(*inputs)[0], model(ids), rtol=1e-6, atol=1e-6)
