"""The backend's fake-tensor check re-runs only what the rewrite changed."""

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

import diagpass
from diagpass.runtime.checks import ChangedNodesFakeProp
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.testing import assert_equivalent


def _chain(mode):
    """x -> relu -> sum, every node carrying a recorded fake value."""
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.relu, (x,))
    z = g.call_function(torch.sum, (y,))
    g.output(z)
    with mode:
        x.meta["example_value"] = torch.empty(3)
        y.meta["example_value"] = torch.empty(3)
        z.meta["example_value"] = torch.empty(())
    return fx.GraphModule(torch.nn.Module(), g), x, y, z


def test_copied_nodes_with_unchanged_inputs_are_reused():
    mode = FakeTensorMode()
    gm, x, y, z = _chain(mode)
    y.meta["diagpass_copied"] = z.meta["diagpass_copied"] = True
    with mode:
        ChangedNodesFakeProp(gm, mode).propagate_dont_convert_inputs(x.meta["example_value"])
    c = diagpass.counters["check"]
    assert (c["fake_check_nodes_reused"], c["fake_check_nodes_run"]) == (2, 2)  # run: placeholder, output


def test_a_value_that_differs_from_what_it_replaces_reruns_everything_below():
    mode = FakeTensorMode()
    gm, x, y, z = _chain(mode)
    z.meta["diagpass_copied"] = True
    with mode:
        y.meta["diagpass_replaces"] = torch.empty(4)  # the original had another shape
        ChangedNodesFakeProp(gm, mode).propagate_dont_convert_inputs(x.meta["example_value"])
    c = diagpass.counters["check"]
    assert (c["fake_check_nodes_reused"], c["fake_check_nodes_run"]) == (0, 4)


def test_armt_check_runs_only_new_nodes():
    model = build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8)
    randomize_memory_(model)
    assert_equivalent(model, torch.randint(0, 128, (1, 8 * 9)), options={"inner": "eager"}, expect_batched=True)
    c = diagpass.counters["check"]
    # glue and the unbatched cells are reused; what runs is the batched calls,
    # their stacks and getitems, and the output
    assert c["fake_check_nodes_reused"] > 1.5 * c["fake_check_nodes_run"] > 0
