import operator

import torch

import diagpass
from diagpass.passes.batch import batch_wavefronts
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.partition import partition
from diagpass.passes.schedule import schedule
from diagpass.runtime.batched_cell import BatchedCell
from diagpass.runtime.lower import lower


def _render(gm):
    """One line per batched call or weight stack; plain copied nodes counted."""
    lines, plain = [], 0
    for n in gm.graph.nodes:
        if n.op == "call_module":
            kinds = []
            for a in n.args:
                if a.target is torch.stack:
                    kinds.append("stack")
                elif a.target is operator.getitem:
                    kinds.append(f"w[{a.args[1].start}:{a.args[1].stop}]")
                else:
                    kinds.append("shared")
            lines.append(f"{n.target}({', '.join(kinds)})")
        elif n.op == "call_function" and n.target is torch.stack and n.args[0][0].op == "placeholder":
            lines.append(f"stack {len(n.args[0])} weights")
    return "\n".join(lines)


GOLDEN = """\
stack 2 weights
stack 2 weights
stack 2 weights
stack 2 weights
diag_t1_g0(stack, w[0:2], w[0:2], stack, w[0:2], w[0:2])
diag_t1_g0(stack, w[0:2], w[0:2], stack, w[0:2], w[0:2])"""


def test_rewrite_golden(per_layer_graph):
    model, x, gm = per_layer_graph
    grid = partition(gm)
    graph = build_cell_graph(grid)
    sched = schedule(grid, graph)
    result = batch_wavefronts(grid, graph, sched, min_group=2)
    assert _render(result.gm) == GOLDEN
    # segment 0 reads a zero memory made by glue: identical to later segments here
    assert [list(g.cells) for g in result.batched_groups] == [[(1, 0), (0, 1)], [(2, 0), (1, 1)]]
    assert diagpass.counters["batch"]["weight_stacks"] == 4
    # both groups have one structure: one module, called twice
    assert diagpass.counters["batch"]["modules"] == 1
    assert len([n for n in result.gm.graph.nodes if n.op == "call_module"]) == 2
    # t=3's (3,0),(2,1): the last segment's memory write is dead, so it differs
    params = [p for p in model.parameters()]
    inputs = [x] + params
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs)
    torch.testing.assert_close(lower(result.gm, "eager")(*inputs), gm(*inputs))


def test_batched_cell_folds_sdpa_into_the_batch_dim():
    import torch.fx as fx
    import torch.nn.functional as F

    def cell(q, k, v, w):
        return (F.scaled_dot_product_attention(q @ w, k, v, is_causal=True) * 2,)

    template = fx.symbolic_trace(cell)
    G, B, H, T, D = 3, 2, 2, 5, 4
    q, k, v = (torch.randn(G, B, H, T, D) for _ in range(3))
    w = torch.randn(D, D)
    batched = BatchedCell(template, (0, 0, 0, None), G)
    (out,) = batched(q, k, v, w)
    expected = torch.stack([cell(q[i], k[i], v[i], w)[0] for i in range(G)])
    torch.testing.assert_close(out, expected)
    assert [p.gm is None for p in batched._pieces] == [False, True, False]
