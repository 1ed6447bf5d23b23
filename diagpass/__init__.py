"""diagpass: diagonal (wavefront) batching of recurrent-memory transformers.

``torch.compile(model, backend="diagonal")`` works without importing this
package (entry point). Importing it also registers the backend, unless the
entry point already did, and the ``diagpass`` log with ``torch._logging``
(``TORCH_LOGS="diagpass"``, see ``diagpass.logs``).
"""

from typing import List

from diagpass import logs  # noqa: F401 - registers TORCH_LOGS="diagpass" before anything logs
from diagpass.backend import diagonal_backend
from diagpass.counters import counters
from diagpass.errors import DiagonalMismatch, NotBatchable
from diagpass.explain import explain
from diagpass.options import Options
from diagpass.regions import mark_compile_regions
from diagpass.weights import stack_weights_
from diagpass.report import DiagonalReport, GraphReport

__all__ = [
    "DiagonalMismatch",
    "DiagonalReport",
    "GraphReport",
    "NotBatchable",
    "Options",
    "counters",
    "diagonal_backend",
    "explain",
    "mark_compile_regions",
    "reports",
    "stack_weights_",
]
__version__ = "0.1.0"


def reports() -> List[GraphReport]:
    """What the diagonal backend did to each graph it compiled in this process,
    newest last (a copy: the backend keeps the most recent 1,024).

    ``reports()[-1]`` is the graph compiled last; a model with graph breaks or
    several input shapes leaves one report per graph. Each is a ``GraphReport``
    (``batched``, ``reason``, ``wavefronts``, ``groups``, ``timings``,
    ``recompile_reason``, ``.plot()``); ``print`` one for the S x L grid.
    """
    from diagpass.report import recorded

    return recorded()


def _register() -> None:
    """Register "diagonal" unless Dynamo will load it from our entry point.

    Dynamo's ``lookup_backend`` imports the entry point (which imports this
    package) and then registers the name itself; registering here as well
    would fail with "duplicate name". So only a source checkout without
    installed metadata registers on import.
    """
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    installed = any(ep.name == "diagonal" for ep in entry_points(group="torch_dynamo_backends"))
    if not installed and "diagonal" not in _COMPILER_FNS:
        from diagpass._entry import diagonal

        register_backend(name="diagonal")(diagonal)


_register()
