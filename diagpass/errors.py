"""Exceptions raised inside the pass pipeline.

``NotBatchable`` is the one "expected" failure: a pass proved (or could not
rule out) that a rewrite would be unsafe. The backend catches it, logs the
reason on the ``diagpass`` logger and compiles the graph unchanged.
"""


class NotBatchable(Exception):
    """The graph is left alone; ``reason`` says why, in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DiagonalMismatch(AssertionError):
    """``verify=True`` found the batched graph's outputs differ from the original's."""
