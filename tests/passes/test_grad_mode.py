"""no-grad blocks inside forward: batched, and gradients still equal eager."""

import torch
import torch.nn as nn

import diagpass
from diagpass.fx_facts import copy_graph_module
from diagpass.passes.grad_mode import detach_no_grad_regions, has_grad_mode_switches
from diagpass.testing import assert_equivalent
from tests.passes.conftest import PerLayerMemory

from .graph_text import render


class GatedLayer(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.w, self.m = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mem):
        x = x + torch.tanh(self.w(x) + mem)
        upd = self.m(x).mean(1, keepdim=True)
        with torch.no_grad():  # as in ARMT's gamma: a gate without gradient
            gate = torch.sigmoid(upd - mem)
        return x, gate * mem + (1 - gate) * upd


class Net(PerLayerMemory):
    def __init__(self, layers=3):
        super().__init__(layers=layers, layer=GatedLayer)


def test_no_grad_region_is_detached_and_batched():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4 * 6, 8, requires_grad=True)
    report = assert_equivalent(model, x, options={"inner": "aot_eager"}, grads=True, expect_batched=True)
    assert diagpass.counters["grad_mode"]["regions_detached"] == 6 * 3
    assert report.graphs[0].num_wavefronts == 6 + 3 - 1


def test_autocast_inside_forward_travels_with_its_nodes():
    class AutocastNet(Net):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = x * 2
            return super().forward(y.float())

    torch.manual_seed(0)
    report = assert_equivalent(
        AutocastNet(), torch.randn(1, 24, 8), options={"inner": "eager", "cost_model": False},
        expect_batched=True, rtol=1e-2, atol=1e-2,
    )
    assert report.graphs[0].num_wavefronts == 6 + 3 - 1


def _capture_with_grad(model, *args):
    """Dynamo's graph of ``model(*args)`` with grad enabled (a no_grad block is
    then recorded as ``_set_grad_enabled`` calls) and the inputs it was given."""
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab)(*args)
    torch._dynamo.reset()
    assert len(captured) == 1
    return captured[0]


GOLDEN_NO_GRAD_BEFORE = """\
linear = linear(l_x_, w.weight, w.bias)
add = add(linear, l_mem_)
tanh = tanh(add)
x = add(l_x_, tanh)
linear_1 = linear(x, m.weight, m.bias)
upd = .mean(linear_1, 1, keepdim=True)
_set_grad_enabled = _set_grad_enabled(False)
sub = sub(upd, l_mem_)
gate = sigmoid(sub)
_set_grad_enabled_1 = _set_grad_enabled(True)
mul = mul(gate, l_mem_)
sub_1 = sub(1, gate)
mul_1 = mul(sub_1, upd)
add_2 = add(mul, mul_1)
return (x, add_2)"""

# the switches are gone; the block's value is detached where it leaves the
# block (``sub``, read only inside, is not)
GOLDEN_NO_GRAD_AFTER = """\
linear = linear(l_x_, w.weight, w.bias)
add = add(linear, l_mem_)
tanh = tanh(add)
x = add(l_x_, tanh)
linear_1 = linear(x, m.weight, m.bias)
upd = .mean(linear_1, 1, keepdim=True)
sub = sub(upd, l_mem_)
gate = sigmoid(sub)
detach = .detach(gate)
mul = mul(detach, l_mem_)
sub_1 = sub(1, detach)
mul_1 = mul(sub_1, upd)
add_2 = add(mul, mul_1)
return (x, add_2)"""


def test_detach_no_grad_regions_golden():
    torch.manual_seed(0)
    layer = GatedLayer()
    x, mem = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 1, 8, requires_grad=True)
    gm, inputs = _capture_with_grad(layer, x, mem)
    assert render(gm) == GOLDEN_NO_GRAD_BEFORE
    assert has_grad_mode_switches(gm)
    original = copy_graph_module(gm)[0]

    assert detach_no_grad_regions(gm) == 1
    assert render(gm) == GOLDEN_NO_GRAD_AFTER
    assert not has_grad_mode_switches(gm)
    assert diagpass.counters["grad_mode"]["regions_detached"] == 1
    gm.graph.lint()

    # equal values and equal gradients (to every input and weight) as the
    # graph that switched grad mode off around the block
    leaves = [a for a in inputs if a.requires_grad]
    assert any(a is mem for a in leaves) and len(leaves) == 6  # x, mem, 4 weights
    ref_out, ref_grads = _value_and_grads(original, inputs, leaves)
    out, got_grads = _value_and_grads(gm, inputs, leaves)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(got_grads, ref_grads, rtol=0, atol=0)
    # the comparison sees the detach: with gradient through the gate, the
    # gradient to ``mem`` differs
    def gate_with_grad(x, mem):
        h = x + torch.tanh(layer.w(x) + mem)
        upd = layer.m(h).mean(1, keepdim=True)
        gate = torch.sigmoid(upd - mem)
        return h, gate * mem + (1 - gate) * upd

    _, through_gate = _value_and_grads(lambda *a: gate_with_grad(x, mem), inputs, leaves)
    k = next(i for i, a in enumerate(leaves) if a is mem)
    assert not torch.allclose(through_gate[k], ref_grads[k])


def _value_and_grads(fn, inputs, leaves):
    out = fn(*inputs)
    loss = sum((o * (i + 1)).sum() for i, o in enumerate(out))
    return [o.detach() for o in out], torch.autograd.grad(loss, leaves)
