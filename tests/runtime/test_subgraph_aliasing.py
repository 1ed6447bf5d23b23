"""Which outputs of a call are views of its operands, and which calls cannot be subgraphs."""

import torch
import torch.fx as fx

from diagpass.runtime.subgraph_aliasing import call_aliasing


def _gm(fn):
    return fx.symbolic_trace(fn)


def _values(*shapes):
    return [torch.randn(*s) for s in shapes]


def test_fresh_outputs_have_no_views():
    aliasing, why = call_aliasing(_gm(lambda x, w: (x @ w, x + 1)), _values((2, 3), (3, 3)))
    assert aliasing is not None and why == ""
    assert aliasing.views == () and aliasing.fresh_outputs(2) == (0, 1)


def test_an_output_viewing_an_operand_is_its_view_chain():
    aliasing, _ = call_aliasing(_gm(lambda h, w: (h @ w, h.detach().transpose(0, 1))), _values((2, 3), (3, 3)))
    (view,) = aliasing.views
    assert (view.output, view.operand) == (1, 0)
    assert aliasing.fresh_outputs(2) == (0,)
    assert [op for op, _, _ in view.views][-1] is torch.ops.aten.transpose.int
    # replayed outside, the chain is the same view of the operand
    g = fx.Graph()
    h = g.placeholder("h")
    g.output(view.emit(g, h))
    x = torch.randn(2, 3)
    out = fx.GraphModule({}, g)(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, x.t())


def test_the_operand_itself_is_an_empty_chain():
    aliasing, _ = call_aliasing(_gm(lambda h, w: (h @ w, h)), _values((2, 3), (3, 3)))
    assert [(v.output, v.operand, v.views) for v in aliasing.views] == [(1, 0, ())]


def test_a_call_that_mutates_an_operand_cannot_be_a_subgraph():
    def f(h, w):
        h.add_(1)
        return (h @ w,)

    aliasing, why = call_aliasing(_gm(f), _values((2, 3), (3, 3)))
    assert aliasing is None and "mutates operand(s) [0]" in why


def test_outputs_sharing_storage_cannot_be_a_subgraph():
    def f(h, w):
        y = h @ w
        return (y, y.view(-1))

    aliasing, why = call_aliasing(_gm(f), _values((2, 3), (3, 3)))
    assert aliasing is None and "share storage" in why
