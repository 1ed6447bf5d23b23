"""The ``diagpass`` logger, registered with ``torch._logging`` like torch's own.

    TORCH_LOGS="diagpass"     per graph, at INFO: cells, wavefronts, groups,
                              every decision with its reason, pass timings
    TORCH_LOGS="+diagpass"    also DEBUG: the S x L grid, tracebacks of
                              fallbacks, the rewritten graph's code
    TORCH_TRACE=/some/dir     structured artifacts for tlparse: the report
                              (text and JSON) and the rewritten graph's code
    torch._logging.set_logs(modules={"diagpass": logging.INFO})   # from Python

Why register at all: an unregistered name in ``TORCH_LOGS`` makes torch fall
back to treating it as a module path, which happens to work for ``diagpass``
but is not listed in ``TORCH_LOGS=help`` and gives no artifact. Registration
happens on ``import diagpass`` (the entry point imports the package too); when
``TORCH_LOGS`` names ``diagpass``, torch itself imports the package while
parsing the variable, so the name is registered before torch looks it up.

The graph-code artifact ``diagpass_graph_code`` follows torch's convention:
printed under ``+diagpass``, or alone with ``TORCH_LOGS="diagpass,diagpass_graph_code"``
(``diagpass`` first: torch validates artifact names left to right, and only
after ``diagpass`` is imported is the artifact name known).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
from typing import Iterator, List, Optional

import torch

from diagpass.counters import counters

LOG_NAME = "diagpass"
GRAPH_CODE_ARTIFACT = "diagpass_graph_code"

log = logging.getLogger(LOG_NAME)


def register() -> None:
    """Make ``diagpass`` a torch log alias and ``diagpass_graph_code`` an artifact.

    Idempotent: re-registering an alias or artifact name only overwrites the
    same entry in torch's registry."""
    from torch._logging._internal import register_artifact, register_log

    register_log(LOG_NAME, [LOG_NAME])
    register_artifact(
        GRAPH_CODE_ARTIFACT,
        "The graph the diagonal backend hands its inner compiler, as Python code.",
    )


register()
graph_code_log = torch._logging.getArtifactLogger(LOG_NAME, GRAPH_CODE_ARTIFACT)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``: the cause, without the context FX
    and torch append to exception messages ("While executing ...", the
    generated code, "Original traceback", tlparse hints)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def quiet_trial(what: str) -> Iterator[None]:
    """Run a trial whose failure is a normal outcome (the fake-tensor check of
    a rewrite) without torch writing tracebacks to stderr on the way.

    Two sources write there while the trial fails: ``torch.fx``'s
    ``_WrappedCall`` prints the generated code around the failing line (a
    plain ``print`` to ``sys.stderr``), and ``FakeTensorMode`` logs the meta
    kernel's exception with its traceback at ERROR. Both are captured. If the
    trial fails, they are logged here at DEBUG only (the caller logs the one
    line naming the cause at INFO); if it succeeds, whatever was captured is
    passed on unchanged, so nothing legitimate is lost.
    """
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    held: List[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    stderr = io.StringIO()
    fake_log.addFilter(hold)
    try:
        with contextlib.redirect_stderr(stderr):
            yield
    except BaseException:
        fake_log.removeFilter(hold)
        _log_held(what, stderr.getvalue(), held)
        raise
    fake_log.removeFilter(hold)
    sys.stderr.write(stderr.getvalue())
    for record in held:
        fake_log.handle(record)


def _log_held(what: str, text: str, records: List[logging.LogRecord]) -> None:
    if not log.isEnabledFor(logging.DEBUG):
        return
    formatter = logging.Formatter("%(name)s: %(message)s")
    parts = [text.strip()] + [formatter.format(r) for r in records]
    detail = "\n".join(p for p in parts if p)
    if detail:
        log.debug("diagpass: %s failed; torch's output during it:\n%s", what, detail)


# --- per-graph report ---------------------------------------------------------


def graph_label(gm) -> str:
    """Dynamo's compile id (``frame/compile``, as in torch's own log prefixes), if any."""
    cid = getattr(gm, "meta", {}).get("dynamo_compile_id")
    return f"graph {cid}" if cid is not None else "graph"


def decisions(report, min_group: int, rolled: bool = False) -> List[str]:
    """Every decision the backend made about one graph, each with its reason
    (``report`` is a ``GraphReport``; ``rolled``: the graph was rewritten for
    ``roll`` without a batched group). Derived from the report only, so the
    log, the JSON artifact and ``explain`` say the same thing."""
    out: List[str] = []
    if report.reason == "disabled by options":
        return ["not analysed: options={'enabled': False} (the sequential baseline)"]
    if report.writes_functionalized:
        out.append(f"in-place writes made private (functionalized): {report.writes_functionalized}")
    if report.cost is not None:
        refused = bool(report.reason and report.reason.startswith("cost:"))
        verdict = "stopped batching" if refused else "did not stop batching"
        out.append(f"cost: {report.cost}: {verdict}")
    if report.batched:
        n = sum(len(g) for g in report.batched_groups)
        out.append(f"batched: {len(report.batched_groups)} groups, {n} cells")
    elif rolled:
        out.append(f"not batched (roll: each distinct cell compiled once): {report.reason}")
    elif report.reason and report.reason.startswith("internal error"):
        out.append("left sequential after an internal error (named in the warning above)")
    else:
        out.append(f"left sequential: {report.reason or 'nothing to batch'}")
    out.extend(_group_decisions(report, min_group))
    return out


def _group_decisions(report, min_group: int) -> List[str]:
    """Why each group that did not batch did not (only for a batched graph:
    otherwise the graph-level reason covers every group)."""
    if not report.batched:
        return []
    batched = {tuple(g) for g in report.batched_groups}
    small, refused = 0, []
    for groups in report.groups:
        for g in groups:
            if tuple(g) in batched:
                continue
            if len(g) < min_group:
                small += 1
            else:
                refused.append(g)
    out = []
    if small:
        out.append(f"{small} groups run cell by cell: fewer than min_group={min_group} "
                   "structurally identical cells in their wavefront")
    for g in refused:
        out.append(f"group {_cells(g)} not batched by the batch pass: a cell that must never "
                   "batch, or an input that differs between its cells and is not a tensor")
    return out


def _groups_line(report) -> str:
    """``1 | 2* | 2* 1 | ...``: wavefront by wavefront, the size of each group."""
    batched = {tuple(g) for g in report.batched_groups}
    return " | ".join(" ".join(f"{len(g)}{'*' if tuple(g) in batched else ''}" for g in groups)
                      for groups in report.groups)


def _cells(cells) -> str:
    return "[" + " ".join(f"({s},{l})" for s, l in cells) + "]"


def summary_lines(report, label: str, min_group: int, rolled: bool = False) -> List[str]:
    """The INFO lines for one graph: shape, groups, decisions, timings."""
    S, L = report.num_segments, report.num_layers
    n_groups = sum(len(w) for w in report.groups)
    if S * L:
        closed = f" (closed form {report.closed_form})" if report.closed_form else ""
        shape = f"{S} segments x {L} layers = {S * L} cells, {report.num_wavefronts} wavefronts{closed}, {n_groups} groups"
    else:
        shape = "no cell grid"
    lines = [f"diagpass: {label}: {report.num_nodes} nodes; {shape}"]
    if report.groups:
        lines.append(f"diagpass: {label}: groups per wavefront (cells in each, * = batched): {_groups_line(report)}")
    lines += [f"diagpass: {label}: {d}" for d in decisions(report, min_group, rolled)]
    if report.recompile_reason:
        lines.append(f"diagpass: {label}: a recompile; the guard that failed: {report.recompile_reason}")
    timings = ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in report.timings.items() if k.endswith("_s"))
    if timings:
        lines.append(f"diagpass: {label}: timings: {timings}")
    return lines


def report_graph(report, gm, rewritten, min_group: int) -> None:
    """Log one compiled graph: INFO summary, DEBUG grid and rewritten code,
    and tlparse artifacts (only built when a trace is being written)."""
    label = graph_label(gm)
    rolled = rewritten is not None and not report.batched
    if log.isEnabledFor(logging.INFO):
        for line in summary_lines(report, label, min_group, rolled):
            log.info("%s", line)
    if log.isEnabledFor(logging.DEBUG) and report.wavefronts:
        log.debug("diagpass: %s: cell -> wavefront (* = batched):\n%s", label, report.grid())
    if rewritten is not None:
        graph_code_log.debug("diagpass: %s: rewritten graph:\n%s", label, _LazyCode(rewritten))
    _trace_artifacts(report, rewritten, min_group, rolled)


class _LazyCode:
    """``gm.code`` read only if the record is emitted."""

    def __init__(self, gm):
        self.gm = gm

    def __str__(self) -> str:
        return self.gm.print_readable(print_output=False)


def _trace_artifacts(report, rewritten, min_group: int, rolled: bool) -> None:
    """Structured-trace artifacts (``TORCH_TRACE``): ``diagpass_report`` (the
    text report with the grid), ``diagpass_report_json`` (the fields plus the
    decisions) and ``diagpass_graph_code``. ``trace_structured`` calls the
    payload functions only when a trace file is open."""
    trace = torch._logging.trace_structured

    def artifact(name: str, encoding: str, payload_fn) -> None:
        trace("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload_fn)

    artifact("diagpass_report", "string", lambda: str(report))
    artifact("diagpass_report_json", "json",
             lambda: {**dataclasses.asdict(report), "decisions": decisions(report, min_group, rolled)})
    if rewritten is not None:
        artifact(GRAPH_CODE_ARTIFACT, "string", lambda: rewritten.print_readable(print_output=False))


# --- recompiles ------------------------------------------------------------------


def recompile_reason() -> Optional[str]:
    """Why Dynamo is compiling this frame again: the guard of the previous
    compile that failed, as Dynamo states it (``"0/1: mode == 'bb'"``,
    ``"0/0: tensor 'x' size mismatch at index 1. expected 16, actual 20"``).

    A backend has no public way to ask. Dynamo computes the reasons in
    ``convert_frame`` just before tracing and stores the first in the
    compile's metrics context (``recompile_reason``), which is still open
    while the backend runs; read it from there. ``None`` on a first compile
    or if torch stops keeping it there. Only the first line is kept (the rest
    is the user stack of the guard)."""
    try:
        from torch._dynamo.utils import get_metrics_context

        metrics = get_metrics_context()
        if not metrics.in_progress():
            return None
        reason = getattr(metrics, "_metrics", {}).get("recompile_reason")
    except Exception:  # noqa: BLE001 - a diagnostic: never worth a failed compile
        return None
    if not reason:
        return None
    head = reason.strip().splitlines()[0]
    return " ".join(head.split())  # Dynamo pads the guard to align its source comment


def warn_near_recompile_limit(gm, reason: Optional[str]) -> None:
    """Dynamo silently runs a frame eagerly after ``recompile_limit`` compiles
    of it: say so one compile before, naming the guard whose failure caused
    this recompile (``logs.recompile_reason``: Dynamo's own words). Most often
    it is the number of segments (Dynamo specialises on it), but a flag, a
    Python scalar or a module attribute can be the cause as well."""
    compile_id = gm.meta.get("dynamo_compile_id")
    attempt = getattr(compile_id, "frame_compile_id", None)
    limit = torch._dynamo.config.recompile_limit
    if isinstance(attempt, int) and attempt + 1 >= limit - 1:
        counters["backend"]["recompile_limit_warnings"] += 1
        log.warning(
            "diagpass: compile %d of this frame; the guard that failed: %s. At "
            "torch._dynamo.config.recompile_limit=%d Dynamo stops compiling this frame and "
            "runs it eagerly. If the guard is on the input length (one graph per number of "
            "segments), pad inputs to a few fixed lengths (whole segments) or use "
            "options={'roll': True}; otherwise keep that value fixed; or raise the limit. "
            'All reasons: TORCH_LOGS="recompiles".',
            attempt + 1,
            reason or "Dynamo did not record one",
            limit,
        )
