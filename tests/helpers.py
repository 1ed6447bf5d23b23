"""Expectations shared by tests: which cells of an S x L grid must batch."""

from typing import List, Set, Tuple


def middle_cells_that_batch(num_segments: int, num_layers: int) -> Set[Tuple[int, int]]:
    """Cells of segments 1..S-2 (structurally identical: they read and write
    memory) that share their wavefront with another such cell. Segment 0 (no
    read) and the last segment (no write: dead code) form their own groups."""
    middle = [(s, l) for s in range(1, num_segments - 1) for l in range(num_layers)]
    by_wave = {}
    for s, l in middle:
        by_wave.setdefault(s + l, []).append((s, l))
    return {c for cells in by_wave.values() if len(cells) > 1 for c in cells}


def anti_diagonals(num_segments: int, num_layers: int) -> List[List[Tuple[int, int]]]:
    return [
        sorted(((t - l, l) for l in range(num_layers) if 0 <= t - l < num_segments), key=lambda c: c[1])
        for t in range(num_segments + num_layers - 1)
    ]
