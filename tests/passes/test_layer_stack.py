"""find_layer_stack on the layouts of real code: FQNs from Dynamo's map, wrappers
with a custom __getattr__, a ModuleList under two names, memory in plain tensor
attributes, a layer whose shapes differ."""

import torch
import torch.nn as nn

import diagpass
from diagpass.fx_facts import placeholder_fqns
from diagpass.passes.partition import find_layer_stack, partition
from tests.helpers import dynamo_graph, middle_cells_that_batch

D, SEG = 8, 4


class Block(nn.Module):
    def __init__(self, hidden=D):
        super().__init__()
        self.up = nn.Linear(D, hidden)
        self.down = nn.Linear(hidden, D)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Wrapper(nn.Module):
    """Holds the layer at .layer, forwards unknown attributes to it, keeps its
    memory in a plain tensor attribute reassigned per segment."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.W_mq = nn.Linear(D, D, bias=False)
        self.reset()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def reset(self):
        self.mem = torch.zeros(1, D, D)
        self.first_seg = True

    def forward(self, x):
        if not self.first_seg:
            x = x + torch.tanh(self.W_mq(x)) @ self.mem
        y = self.layer(x)
        self.mem = self.mem + y.transpose(1, 2) @ y / y.shape[1]
        self.first_seg = False
        return y


class Model(nn.Module):
    def __init__(self, hidden=(D, D, D, D), via_alias=True):
        super().__init__()
        self.via_alias = via_alias
        self.inner = nn.Module()
        self.inner.layers = nn.ModuleList(Block(h) for h in hidden)
        for i in range(len(self.inner.layers)):  # written into the list in place
            self.inner.layers[i] = Wrapper(self.inner.layers[i])
        self.alias = self.inner.layers  # the same list under a second name

    def forward(self, x):
        layers = self.alias if self.via_alias else self.inner.layers
        for layer in layers:
            layer.reset()
        outs = []
        for seg in x.split(SEG, dim=1):
            for layer in layers:
                seg = layer(seg)
            outs.append(seg)
        return torch.cat(outs, 1)


def test_fqns_name_wrapped_layers_without_the_dict_steps():
    gm, _ = dynamo_graph(Model(via_alias=False), torch.randn(2, 3 * SEG, D))
    fqns = set(placeholder_fqns(gm).values())
    assert "inner.layers.0.layer.up.weight" in fqns and "inner.layers.3.W_mq.weight" in fqns
    assert not any("dict" in f for f in fqns)
    stack = find_layer_stack(gm)
    assert stack.num_layers == 4 and stack.prefixes == ["inner.layers"]
    assert {"inner.layers.*.layer.up.weight", "inner.layers.*.W_mq.weight"} <= set(stack.param_role.values())


def test_a_list_used_under_its_alias_is_found_by_the_names_it_is_reached_by():
    """named_parameters (hence the FQN map) names one path per parameter; Dynamo
    names the placeholder by the path the code used. Unmatched placeholders fall
    back to that path: one placeholder per parameter object either way."""
    gm, _ = dynamo_graph(Model(via_alias=True), torch.randn(2, 3 * SEG, D))
    stack = find_layer_stack(gm)
    assert stack.num_layers == 4 and stack.prefixes == ["alias"]
    assert len(stack.param_layer) == len(set(stack.param_layer)) == 4 * 5


def test_without_the_fqn_map_the_names_still_give_the_stack():
    """Graphs from torch._dynamo.explain carry no FQN map."""
    gm, _ = dynamo_graph(Model(via_alias=False), torch.randn(2, 3 * SEG, D))
    del gm.meta["dynamo_flat_name_to_original_fqn"]
    assert placeholder_fqns(gm) == {}
    assert find_layer_stack(gm).num_layers == 4


def test_wrapped_aliased_attribute_memory_batches_exactly():
    model = Model()
    x = torch.randn(2, 5 * SEG, D)
    ref = model(x)
    ref_mem = [layer.mem.clone() for layer in model.alias]
    torch._dynamo.reset()
    out = torch.compile(model, backend="diagonal", options={"inner": "eager", "cost_model": False})(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for layer, want in zip(model.alias, ref_mem):
        torch.testing.assert_close(layer.mem, want, rtol=1e-5, atol=1e-5)
        assert layer.first_seg is False
    report = diagpass.reports()[-1]
    assert report.batched and report.num_wavefronts == 5 + 4 - 1
    assert middle_cells_that_batch(5, 4) <= {c for g in report.batched_groups for c in g}


def test_one_wider_layer_keeps_its_place_and_the_others_batch():
    """Layer 2 has a wider MLP: it gets roles of its own (never stacked with the
    others); the identical layers still batch, and the output is exact."""
    model = Model(hidden=(D, D, 2 * D, D))
    x = torch.randn(2, 6 * SEG, D)
    gm, _ = dynamo_graph(model, x)
    stack = find_layer_stack(gm)
    assert stack.num_layers == 4
    roles_of = lambda i: {r for n, r in stack.param_role.items() if stack.param_layer[n] == i}  # noqa: E731
    prefix = stack.prefixes[0]
    assert all(r.startswith(prefix + ".*1.") for r in roles_of(2))
    assert all(r.startswith(prefix + ".*.") for r in roles_of(3))
    assert len(partition(gm).cells) == 6 * 4

    ref = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend="diagonal", options={"inner": "eager", "cost_model": False})(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = diagpass.reports()[-1]
    assert report.batched and report.num_wavefronts == 6 + 4 - 1
    # Segments 1..5 of layers 0, 1, 3 are alike (the last one too: its memory is
    # an output, the attribute); each wavefront's alike cells form one group, so
    # layer 3 shares groups with layers 0 and 1 across the different layer 2 (its
    # weights are row 2 of its roles' stacks, not row 3).
    expected = {}
    for s_ in range(1, 6):
        for l in (0, 1, 3):
            expected.setdefault(s_ + l, []).append((s_, l))
    want = sorted(sorted(g) for g in expected.values() if len(g) > 1)
    assert sorted(sorted(g) for g in report.batched_groups) == want


def test_two_layers_alike_are_needed_for_a_stack():
    model = Model(hidden=(D, 2 * D, 3 * D, 4 * D))
    gm, _ = dynamo_graph(model, torch.randn(2, 3 * SEG, D))
    import pytest

    from diagpass.errors import NotBatchable

    with pytest.raises(NotBatchable, match="at least two of equal shapes"):
        find_layer_stack(gm)
