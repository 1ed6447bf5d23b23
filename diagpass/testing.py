"""Prove, on your own model, that ``backend="diagonal"`` changes nothing.

    from diagpass.testing import assert_equivalent
    report = assert_equivalent(model, input_ids, grads=True, expect_batched=True)

``assert_equivalent`` compiles ``model`` with the diagonal backend, compares
outputs (and with ``grads=True`` every parameter's gradient) against eager,
and checks that batching did or did not happen. Hypothesis strategies that
draw whole RMT-style models live in ``diagpass.testing_strategies``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from diagpass import backend as _backend
from diagpass.counters import counters
from diagpass.report import DiagonalReport


def _loss(out, seed: int = 0) -> torch.Tensor:
    """A scalar that weights every output element differently (a plain sum
    would hide errors that cancel, e.g. a permutation of the batch)."""
    tensors = [t for t in _flatten(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in tensors:
        w = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
        total = total + (t * w).sum()
    return total


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [x for v in out.values() for x in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [x for v in out for x in _flatten(v)]
    return []


def _grads(model: torch.nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _run(fn, model, args, kwargs, grads: bool):
    if grads:
        model.zero_grad(set_to_none=True)
        out = fn(*args, **kwargs)
        _loss(out).backward()
        return out, _grads(model)
    with torch.no_grad():
        return fn(*args, **kwargs), None


def assert_equivalent(
    model: torch.nn.Module,
    *args,
    options: Optional[dict] = None,
    grads: bool = False,
    expect_batched: Optional[bool] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    reset: bool = True,
    **kwargs,
) -> DiagonalReport:
    """Compile ``model`` with ``backend="diagonal"`` and assert it equals eager.

    - outputs within ``rtol``/``atol`` (``torch.testing.assert_close``);
    - with ``grads=True``, every parameter's gradient of a fixed random
      projection of the outputs, within ``rtol`` and ``atol`` scaled by the
      gradient's own magnitude;
    - ``expect_batched=True``/``False``: at least one / no graph was batched.

    ``reset=True`` clears Dynamo's caches first, so the model is traced anew
    with these options. Returns the report of the graphs compiled.
    """
    if reset:
        torch._dynamo.reset()
    expected, expected_grads = _run(model, model, args, kwargs, grads)
    first = len(_backend.reports)
    batched_before = counters["backend"]["graphs_batched"]
    compiled = torch.compile(model, backend="diagonal", options=dict(options or {}))
    actual, actual_grads = _run(compiled, model, args, kwargs, grads)
    report = DiagonalReport(list(_backend.reports[first:]))

    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"outputs differ: {m}\n{report}")
    if grads:
        _assert_grads_close(actual_grads, expected_grads, rtol, atol)
    batched = counters["backend"]["graphs_batched"] > batched_before
    if expect_batched is not None and batched != expect_batched:
        raise AssertionError(
            f"expected the diagonal backend {'to' if expect_batched else 'not to'} batch, "
            f"but it {'did' if batched else 'did not'}:\n{report}"
        )
    return report


def _assert_grads_close(actual, expected, rtol, atol) -> None:
    problems: List[str] = []
    for name, ref in expected.items():
        got = actual.get(name)
        if ref is None or got is None:
            if (ref is None) != (got is None):
                problems.append(f"{name}: gradient is {'missing' if got is None else 'unexpected'}")
            continue
        scale = max(1.0, float(ref.abs().max()))
        try:
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * scale)
        except AssertionError as e:
            problems.append(f"{name}: {str(e).splitlines()[0]} {str(e).splitlines()[2:4]}")
    if problems:
        raise AssertionError("gradients differ:\n  " + "\n  ".join(problems))
