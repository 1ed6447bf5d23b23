"""Prove, on your own model, that ``backend="diagonal"`` changes nothing.

    from diagpass.testing import assert_equivalent
    report = assert_equivalent(model, input_ids, grads=True, expect_batched=True)

``assert_equivalent`` compiles ``model`` with the diagonal backend, compares
outputs (and with ``grads=True`` every parameter's gradient) against eager,
and checks that batching did or did not happen. Its rule for gradients that
miss the tolerance is ``assert_grads_as_exact_as_eager`` (on the parameter
gradients ``gradients`` returns). Hypothesis strategies that
draw whole RMT-style models live in ``diagpass.testing_strategies``; this
module needs no hypothesis (tested with hypothesis blocked from importing).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from diagpass import report as _reports
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


def gradients(fn, model: torch.nn.Module, *args, **kwargs) -> Dict[str, Optional[torch.Tensor]]:
    """Parameter name -> gradient (None where unused) of the fixed random
    projection of ``fn(*args, **kwargs)`` that ``assert_equivalent`` compares;
    ``fn`` is ``model`` itself or ``model`` compiled. ``.grad`` is reset first."""
    return _run(fn, model, args, kwargs, True)[1]


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
      gradient's own magnitude -- or, where eager fp32 itself is further than
      that from the exact (fp64) gradient, at most 2x eager's own error (or 2x
      the sequential compiled model's, when reordering alone costs more);
    - ``expect_batched=True``/``False``: at least one / no graph was batched.

    ``reset=True`` clears Dynamo's caches first, so the model is traced anew
    with these options. Returns the report of the graphs compiled.
    """
    if reset:
        torch._dynamo.reset()
    expected, expected_grads = _run(model, model, args, kwargs, grads)
    first = _reports.report_count()
    batched_before = counters["backend"]["graphs_batched"]
    compiled = torch.compile(model, backend="diagonal", options=dict(options or {}))
    actual, actual_grads = _run(compiled, model, args, kwargs, grads)
    report = DiagonalReport(_reports.reports_since(first))

    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        _assert_outputs_as_exact_as_eager(model, args, kwargs, actual, expected, atol, f"outputs differ: {e}\n{report}")
    if grads:
        try:
            _assert_grads_close(actual_grads, expected_grads, rtol, atol)
        except AssertionError:
            # Deep recurrences amplify rounding: eager fp32 itself can be 1e-4 off
            # the exact gradient. Then the claim to check is "as exact as eager".
            assert_grads_as_exact_as_eager(model, args, kwargs, actual_grads, expected_grads, atol)
    batched = counters["backend"]["graphs_batched"] > batched_before
    if expect_batched is not None and batched != expect_batched:
        raise AssertionError(
            f"expected the diagonal backend {'to' if expect_batched else 'not to'} batch, "
            f"but it {'did' if batched else 'did not'}:\n{report}"
        )
    return report


def assert_matches_eager(model: torch.nn.Module, actual, *args, rtol: float = 1e-5, atol: float = 1e-5, **kwargs) -> None:
    """Assert ``actual`` (an output you computed yourself, e.g. from a model
    compiled once and called at several lengths) equals ``model(*args,
    **kwargs)`` in eager, by ``assert_equivalent``'s rule for outputs: within
    ``rtol``/``atol``, or else at most 2x eager fp32's own error against an
    fp64 run (deep recurrences make eager fp32 itself 1e-5 off the exact
    result on some inputs)."""
    with torch.no_grad():
        expected = model(*args, **kwargs)
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        _assert_outputs_as_exact_as_eager(model, args, kwargs, actual, expected, atol, f"outputs differ: {e}")


def rounding_sensitivity(model: torch.nn.Module, *args, draws: int = 3, **kwargs) -> float:
    """How far ``model``'s fp32 output moves when every weight is perturbed by
    about one unit of fp32 rounding (relative 2**-24 x N(0, 1)): the noise floor
    below which two exact computations of it cannot be told apart. For a
    well-conditioned model this is ~1e-7; the thorough run found associative
    models where it is 5e-3."""
    import copy

    with torch.no_grad():
        base = _flatten(model(*args, **kwargs))
        worst = 0.0
        g = torch.Generator().manual_seed(0)
        for _ in range(draws):
            twin = copy.deepcopy(model, _state_memo(model))
            for p in twin.parameters():
                if p.is_floating_point():
                    p.mul_(1 + 2.0**-24 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
            for a, b in zip(base, _flatten(twin(*args, **kwargs))):
                if a.is_floating_point():
                    worst = max(worst, float((a.double() - b.double()).abs().max()))
    return worst


def assert_fp32_within_noise_floor(model: torch.nn.Module, *args, options: Optional[dict] = None, **kwargs) -> dict:
    """The last word on an fp32 gap of an ill-conditioned model, once float64
    has shown the rewrite exact: the compiled fp32 output may be off an fp64
    run of the same weights by at most 4x the larger of eager fp32's own error
    and the model's ``rounding_sensitivity`` (eager's own error can be small by
    luck of its rounding order). Returns the three numbers (err, own, floor)."""
    torch._dynamo.reset()
    with torch.no_grad():
        exact = float64_copy(model)(*args, **kwargs)
        own = float((model(*args, **kwargs).double() - exact).abs().max())
        got = torch.compile(model, backend="diagonal", options=dict(options or {}))(*args, **kwargs)
    err = float((got.double() - exact).abs().max())
    floor = rounding_sensitivity(model, *args, **kwargs)
    assert err <= 4 * max(own, floor) + 1e-5, (
        f"fp32 error {err} vs eager fp32's own error {own}, rounding sensitivity {floor}"
    )
    return {"err": err, "own": own, "floor": floor}


def _state_memo(model: torch.nn.Module) -> dict:
    """``deepcopy`` memo mapping every non-leaf tensor a module keeps in a plain
    attribute (memory stored as ``self.mem = ...``, as research code does) to a
    detached copy: ``deepcopy`` refuses non-leaf tensors."""
    memo: dict = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return memo


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 twin of ``model`` (same weights), the oracle for "as exact as
    eager"; works for models that keep graph-attached state in attributes."""
    import copy

    return copy.deepcopy(model, _state_memo(model)).double()


def _float64(model, args, kwargs):
    exact_model = float64_copy(model)
    to64 = lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    return exact_model, [to64(a) for a in args], {k: to64(v) for k, v in kwargs.items()}


def _sequential_compiled(model, args, kwargs, grads: bool):
    """Outputs and gradients of ``model`` compiled *without* the pass (inner
    aot_eager and Inductor): the same math in another rounding order. Where a
    model is ill-conditioned (a division by ``q.z + eps`` with ``q.z == 0``
    makes intermediates of 1e9 that cancel), eager fp32 can match fp64 by
    identical rounding on both sides of a cancellation while any reordering,
    with or without batching, cannot; these runs measure that reorder noise."""
    runs = []
    for inner in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        fn = torch.compile(model, backend="diagonal", options={"inner": inner, "enabled": False})
        runs.append(_run(fn, model, args, kwargs, grads))
    torch._dynamo.reset()
    return runs


def _assert_outputs_as_exact_as_eager(model, args, kwargs, actual, expected, atol, message, factor=2.0) -> None:
    """Fallback when outputs miss rtol/atol: a deep recurrence can amplify
    rounding beyond 1e-5 in eager fp32 itself. Then require the compiled
    output's error vs an fp64 run to be within ``factor`` x the reference error:
    eager's own, or if that is not enough, the largest of eager's and the
    sequential compiled model's (``_sequential_compiled``)."""
    if not all(t.is_floating_point() for t in _flatten(expected)) or not _flatten(expected):
        raise AssertionError(message)
    exact_model, args64, kwargs64 = _float64(model, args, kwargs)
    with torch.no_grad():
        exact = _flatten(exact_model(*args64, **kwargs64))

    def worst(refs):
        out = []
        for got, ex, *others in zip(_flatten(actual), exact, *[_flatten(r) for r in refs]):
            noise = max(float((o.double() - ex).abs().max()) for o in others)
            out.append((float((got.double() - ex).abs().max()), noise))
        return out

    checks = worst([expected])
    if any(ours > factor * noise + atol for ours, noise in checks):
        seq = [out for out, _ in _sequential_compiled(model, args, kwargs, grads=False)]
        checks = worst([expected, *seq])
    for ours, noise in checks:
        if ours > factor * noise + atol:
            raise AssertionError(f"{message}\n(and vs fp64: error {ours:.3g} > {factor} x reference {noise:.3g} + {atol})")
    counters["testing"]["outputs_checked_against_fp64"] += 1


def assert_grads_as_exact_as_eager(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    actual: Dict[str, Optional[torch.Tensor]],
    expected: Dict[str, Optional[torch.Tensor]],
    atol: float = 1e-5,
    factor: float = 2.0,
    sequential: Optional[Callable] = None,
) -> None:
    """``assert_equivalent``'s rule for gradients that miss rtol/atol.

    ``actual`` and ``expected`` are parameter name -> gradient (``gradients``
    gives them: compiled and eager). Against an fp64 copy of the model, the
    compiled gradients' error must be within ``factor`` times the reference
    error (plus ``atol`` x the gradient's magnitude): eager fp32's own, or if
    that is not enough, the largest of eager's and the sequential compiled
    model's. ``sequential(model, args, kwargs, grads=True)`` returns the
    sequential compiled runs as a list of (outputs, gradients); by default the
    model compiled without the pass (inner aot_eager and Inductor)."""
    # A gradient that one side has and the other lacks is never rounding: eager's None
    # and a zero tensor differ to an optimizer (AdamW decays a parameter with a grad).
    presence = _presence_problems(actual, expected)
    if presence:
        raise AssertionError("gradients differ:\n  " + "\n  ".join(presence))
    sequential = _sequential_compiled if sequential is None else sequential
    exact_model, args64, kwargs64 = _float64(model, args, kwargs)
    _, exact = _run(exact_model, exact_model, args64, kwargs64, True)

    def problems(refs):
        found = []
        for name, ref in exact.items():
            if ref is None or expected.get(name) is None or actual.get(name) is None:
                continue
            scale = max(1.0, float(ref.abs().max()))
            noise = max(float((r[name].double() - ref).abs().max()) for r in refs if r.get(name) is not None)
            ours = float((actual[name].double() - ref).abs().max())
            if ours > factor * noise + atol * scale:
                found.append(f"{name}: error vs fp64 {ours:.3g} > {factor} x reference fp32 error {noise:.3g} + {atol * scale:.3g}")
        return found

    found = problems([expected])
    if found:
        seq = [g for _, g in sequential(model, args, kwargs, grads=True)]
        found = problems([expected, *seq])
        counters["testing"]["grads_checked_against_sequential_compiled"] += 1
    counters["testing"]["grads_checked_against_fp64"] += 1
    if found:
        raise AssertionError("gradients less exact than eager's and the sequential compiled model's:\n  " + "\n  ".join(found))


def _presence_problems(actual, expected) -> List[str]:
    return [f"{name}: gradient is {'missing' if actual.get(name) is None else 'unexpected'}"
            for name in expected if (expected[name] is None) != (actual.get(name) is None)]


def _assert_grads_close(actual, expected, rtol, atol) -> None:
    problems: List[str] = _presence_problems(actual, expected)
    for name, ref in expected.items():
        got = actual.get(name)
        if ref is None or got is None:
            continue
        scale = max(1.0, float(ref.abs().max()))
        try:
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * scale)
        except AssertionError as e:
            problems.append(f"{name}: {str(e).splitlines()[0]} {str(e).splitlines()[2:4]}")
    if problems:
        raise AssertionError("gradients differ:\n  " + "\n  ".join(problems))
