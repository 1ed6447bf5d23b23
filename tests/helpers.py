"""Shared by tests: which cells of an S x L grid must batch; Dynamo's graph of a model."""

from typing import List, Set, Tuple

import torch


def dynamo_graph(model, *args, **kwargs):
    """(Dynamo's first FX graph of ``model(*args, **kwargs)`` under no_grad,
    the example inputs Dynamo hands a backend with it)."""
    return dynamo_graphs(model, args, kwargs=kwargs)[0]


def dynamo_graphs(model, *calls, kwargs=None):
    """Dynamo's (graph, example inputs) for each of ``calls`` (argument tuples) of one
    compiled ``model``, under no_grad: from the second shape on, graphs Dynamo made dynamic."""
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab)
    with torch.no_grad():
        for args in calls:
            compiled(*args, **(kwargs or {}))
    torch._dynamo.reset()
    return captured


def middle_cells_that_batch(num_segments: int, num_layers: int, last_joins: bool = True) -> Set[Tuple[int, int]]:
    """Cells of segments 1..S-1 that share their wavefront with another such cell: the
    middle segments read and write memory; the last one's write is dead, and
    ``passes/complete_cells.py`` gives it the middle cells' outputs (from S = 3 on: its
    neighbour must be a middle cell; not when it is shorter, ``last_joins=False``).
    Segment 0 (no read) forms its own groups."""
    last = num_segments if num_segments >= 3 and last_joins else num_segments - 1
    middle = [(s, l) for s in range(1, last) for l in range(num_layers)]
    by_wave = {}
    for s, l in middle:
        by_wave.setdefault(s + l, []).append((s, l))
    return {c for cells in by_wave.values() if len(cells) > 1 for c in cells}


def anti_diagonals(num_segments: int, num_layers: int) -> List[List[Tuple[int, int]]]:
    return [
        sorted(((t - l, l) for l in range(num_layers) if 0 <= t - l < num_segments), key=lambda c: c[1])
        for t in range(num_segments + num_layers - 1)
    ]


def analyze(gm, options, example_inputs=None):
    """(the lowered rewritten graph or None, the report) of ``diagpass.pipeline.run``."""
    from diagpass.pipeline import run

    plan = run(gm, options, example_inputs)
    return (plan.rewrite.gm if plan.rewrite is not None else None), plan.report


def assert_same_outputs(gm, other, inputs) -> None:
    """``other`` (a cut or rewritten copy of ``gm``) returns ``gm``'s outputs bit for bit."""
    with torch.no_grad():
        want, got = gm(*inputs), other(*inputs)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def steps_armt():
    """The small ARMT the step tests compile (3 layers, randomised memory)."""
    from diagpass.models.armt import build_armt, randomize_memory_

    return randomize_memory_(build_armt("llama", num_layers=3, segment_size=8, num_mem_tokens=2, d_mem=8, seed=5))


class Autocast(torch.nn.Module):
    """``model`` run under ``torch.autocast`` inside ``forward`` (research code's form of bf16):
    Dynamo records the region in the graph; the output stays bf16, so a step that lost the
    region would show in the dtype, not only in rounding."""

    def __init__(self, model: torch.nn.Module, dtype=torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, ids):
        with torch.autocast("cpu", dtype=self.dtype):
            return self.model(ids)


def autocast_regions(gm) -> List[str]:
    """The autocast enter/exit calls of ``gm``, in order, by name."""
    names = ("_enter_autocast", "_exit_autocast")
    return [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in names]


def steps_ids(num_segments: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, 8 * num_segments), generator=torch.Generator().manual_seed(num_segments))


def research_shape(form: str):
    """A 3-layer model in one of research code's loop shapes: "family" (the associative
    family model, segment-major), "layer_major" (each layer loops over the segments) or
    "official_horizontal" (the current official armt.py shape)."""
    from diagpass.models.family import FamilyConfig, build_family_model
    from diagpass.models.official_shapes import build_official_shape

    if form == "official_horizontal":
        return build_official_shape("horizontal")
    cfg = FamilyConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind="associative", layer_major=form == "layer_major")
    return build_family_model(cfg, seed=0).eval()

