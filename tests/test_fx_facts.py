"""fx_facts: graph_structure (the key compiled steps are shared by), and the one graph copy."""
import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from diagpass.fx_facts import copy_graph_module, graph_structure


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


def test_a_copied_graph_generates_its_python_code_only_when_run():
    # the passes copy graphs of ten thousand nodes and only read them: generating the
    # code of each copy cost seconds a compile (issue 16's second segment count)
    gm = fx.symbolic_trace(lambda x: torch.relu(x) * 2 + 1)
    copy, nodes = copy_graph_module(gm)
    generated = []
    original = fx.GraphModule.recompile
    try:
        fx.GraphModule.recompile = lambda self: generated.append(self) or original(self)
        copy.graph.eliminate_dead_code()
        copy.recompile()
        assert generated == []  # marked stale, nothing generated
        x = torch.randn(5)
        torch.testing.assert_close(copy(x), gm(x), rtol=0, atol=0)
        assert generated == [copy]  # generated once, by the first call
        copy(x)
        assert generated == [copy]
    finally:
        fx.GraphModule.recompile = original
    assert set(nodes) == set(gm.graph.nodes) and "relu" in copy.code
