"""``GraphReport.plot``: the S x L cell grid as a picture.

Each cell (segment s, layer l) is coloured by the wavefront it runs in; cells
that ran inside a batched group get a black outline and the cells of one group
are joined by a line (they lie on one anti-diagonal for per-layer memory).
A text grid says the same (``str(report)``); the picture is for S and L too
large to read as text, and for the README.

matplotlib is imported here, on first use, not by ``import diagpass``: it is an
optional extra (``pip install 'diagpass[plot]'``). The figure is built with
``matplotlib.figure.Figure``, not ``pyplot``, so no GUI backend or global
figure state is touched.
"""

from __future__ import annotations

import math

#: Above this many cells the wavefront numbers are not written into the cells.
MAX_ANNOTATED_CELLS = 400


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("GraphReport.plot needs matplotlib: pip install 'diagpass[plot]'") from e
    return Figure


def plot_grid(report, path=None, ax=None):
    """Draw ``report`` (a ``GraphReport``) on ``ax`` or a new figure; save to ``path`` if given.

    Returns the Figure. Raises ``ValueError`` for a report without a cell grid
    (a graph the pass could not partition: there is nothing to draw)."""
    if not report.wavefronts:
        raise ValueError(f"nothing to plot: the report has no cell grid ({report.reason or 'no cells'})")
    Figure = _matplotlib()
    S, L = report.num_segments, report.num_layers
    if ax is None:
        fig = Figure(figsize=(min(2 + 0.45 * L, 14), min(1.5 + 0.35 * S, 20)), dpi=100)
        ax = fig.subplots()
    else:
        fig = ax.figure
    grid = _wavefront_array(report)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest",
                      vmin=0, vmax=max(report.num_wavefronts - 1, 1))
    _mark_batched(ax, report)
    if S * L <= MAX_ANNOTATED_CELLS:
        _annotate(ax, grid, image)
    ax.set_xlabel("layer l")
    ax.set_ylabel("segment s")
    ax.set_xticks(range(L))
    ax.set_yticks(range(S) if S <= 40 else range(0, S, max(1, S // 20)))
    n_cells = sum(len(g) for g in report.batched_groups)
    ax.set_title(f"S={S}, L={L}: {report.num_wavefronts} wavefronts, "
                 f"{len(report.batched_groups)} batched groups ({n_cells} cells)\n"
                 "outlined: batched; a line joins one group's cells", fontsize=8)
    fig.colorbar(image, ax=ax, label="wavefront t")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


def _wavefront_array(report):
    """S x L list of wavefront indices; NaN where no cell was found."""
    grid = [[math.nan] * report.num_layers for _ in range(report.num_segments)]
    for t, cells in enumerate(report.wavefronts):
        for s, l in cells:
            grid[s][l] = t
    return grid


def _mark_batched(ax, report) -> None:
    from matplotlib.patches import Rectangle

    for group in report.batched_groups:
        for s, l in group:
            ax.add_patch(Rectangle((l - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.8))
        if len(group) > 1:
            ls, ss = zip(*[(l, s) for s, l in sorted(group, key=lambda c: c[1])])
            ax.plot(ls, ss, color="white", linewidth=1.0, alpha=0.8, zorder=2)


def _annotate(ax, grid, image) -> None:
    """Each cell's wavefront number, on a patch of the cell's own colour so the
    group lines pass behind it."""
    for s, row in enumerate(grid):
        for l, t in enumerate(row):
            if not math.isnan(t):
                colour = image.cmap(image.norm(t))
                dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 0.5
                ax.text(l, s, str(int(t)), ha="center", va="center", fontsize=8, zorder=3,
                        color="white" if dark else "black",
                        bbox=dict(boxstyle="round,pad=0.2", facecolor=colour, edgecolor="none"))
