"""``diagpass.explain``: what the backend would do to a model, without running it batched."""

from __future__ import annotations

from typing import Optional

import torch

from diagpass import pipeline
from diagpass.options import Options
from diagpass.report import DiagonalReport


def explain(model, *args, options: Optional[dict] = None, **kwargs) -> DiagonalReport:
    """Trace ``model(*args, **kwargs)`` with Dynamo and report, graph by graph,
    the cell grid, the wavefronts, which groups batch, and why not when not.

    Uses ``torch._dynamo.explain``, which resets Dynamo's caches before and
    after (compiled models recompile on their next call).
    """
    opts = Options.from_dict(options)
    out = torch._dynamo.explain(model)(*args, **kwargs)
    graphs = [pipeline.run(gm, opts).report for gm in out.graphs]
    breaks = [str(getattr(r, "reason", r)) for r in out.break_reasons]
    return DiagonalReport(graphs, breaks)
