"""fx_facts.graph_structure: the key compiled steps are shared by."""
import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from diagpass.fx_facts import graph_structure


def _graph(region=None) -> fx.GraphModule:
    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2)
    if region is not None:
        for n in gm.graph.nodes:
            if n.op == "call_function":
                n.meta.update(recompute=CheckpointPolicy.PREFER_RECOMPUTE, ac_graph_id=region)
    return gm


def test_checkpointed_and_plain_graphs_are_different_structures():
    # a step compiled without recompute tags must not serve a checkpointed one (it would save
    # every activation the user asked to recompute)
    assert graph_structure(_graph()) != graph_structure(_graph(region=7))


def test_checkpoint_region_ids_are_numbered_per_graph():
    # torch numbers regions per process: the same region in two segments has two ids
    assert graph_structure(_graph(region=7)) == graph_structure(_graph(region=123))
