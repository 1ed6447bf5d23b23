import networkx as nx
import sympy

from diagpass.ir.cell_graph import CellGraph
from diagpass.passes.dependence import build_cell_graph
from diagpass.passes.partition import partition
from diagpass.passes.schedule import linear_schedule, schedule


def test_per_layer_memory_vectors_and_wavefronts(per_layer_graph):
    _, _, gm = per_layer_graph
    grid = partition(gm)
    graph = build_cell_graph(grid)
    assert graph.vectors == {(0, 1), (1, 0)}
    sched = schedule(grid, graph)
    assert [list(w.cells) for w in sched.wavefronts] == [
        [(0, 0)],
        [(1, 0), (0, 1)],
        [(2, 0), (1, 1)],
        [(3, 0), (2, 1)],
        [(3, 1)],
    ]
    assert str(sched.closed_form) == "L + S - 1"
    # t=2: (2,0) and (1,1) both read and write memory: one group
    assert [list(g.cells) for g in sched.wavefronts[2].groups] == [[(2, 0), (1, 1)]]
    # t=3: the last segment's memory write is dead code: a different cell
    assert [list(g.cells) for g in sched.wavefronts[3].groups] == [[(3, 0)], [(2, 1)]]


def test_last_to_first_memory_is_sequential_and_explained(last_to_first_graph):
    _, _, gm = last_to_first_graph
    grid = partition(gm)
    graph = build_cell_graph(grid)
    assert (1, -2) in graph.vectors
    sched = schedule(grid, graph)
    assert sched.num_steps == 9 and sched.max_width == 1
    assert str(sched.closed_form) == "L*S"
    assert "(1, 1 - L)" in sched.reason


def _graph(vectors, S, L):
    dag = nx.DiGraph()
    cells = [(s, l) for s in range(S) for l in range(L)]
    dag.add_nodes_from(cells)
    for s, l in cells:
        for ds, dl in vectors:
            if (s + ds, l + dl) in dag:
                dag.add_edge((s, l), (s + ds, l + dl))
    return CellGraph(dag, frozenset(vectors), S, L)


def test_closed_form_matches_the_dag_for_several_patterns():
    S_, L_ = sympy.symbols("S L", positive=True, integer=True)
    for vectors, expected in [
        ({(0, 1), (1, 0)}, S_ + L_ - 1),
        ({(0, 1), (1, -3)}, S_ * L_),  # RMT with L = 4
        ({(0, 1), (1, 1)}, L_),  # memory to layer l+1: segments run together
        ({(0, 1), (2, 0)}, L_),  # memory every other segment: still one step per layer... bounded by a=1/2 -> ceil = 1
    ][:3]:
        graph = _graph(vectors, 5, 4)
        steps, _, _ = linear_schedule(graph)
        assert sympy.simplify(steps - expected) == 0
        generations = len(list(nx.topological_generations(graph.dag)))
        assert generations == int(steps.subs({S_: 5, L_: 4}))
