"""diagpass: diagonal (wavefront) batching of recurrent-memory transformers.

``torch.compile(model, backend="diagonal")`` works without importing this
package (entry point). Importing it also registers the backend, unless the
entry point already did.
"""

from diagpass.backend import DiagonalMismatch, Options, diagonal_backend
from diagpass.counters import counters
from diagpass.errors import NotBatchable
from diagpass.explain import explain
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
    "stack_weights_",
]
__version__ = "0.1.0"


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
