"""Build models, compile the modes, time them side by side in one process."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from .configs import Point

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ALL_MODES = ["eager", "inductor", "inductor_bl", "diagonal", "diag_stacked", "stacked_inline", "seq_inline", "seq_steps", "diag_wsteps", "stacked_wsteps", "stacked_fixed_width", "stacked_batched", "stacked_glue_in", "stacked_whole", "diag_cached", "diag_pywrapper", "stacked_pywrapper", "rolled", "rolled_glue", "seq_rolled", "diag_aot",
             "bound", "base_eager", "base_inductor"]
QUICK_MODES = ["eager", "inductor", "diagonal", "diag_stacked", "base_eager"]
DEFAULT_MODES = ["eager", "inductor", "inductor_bl", "diagonal", "diag_stacked", "bound", "base_eager",
                 "base_inductor"]
# Optimus (Inductor's group/batch fusion) for the second sequential baseline: stack independent
# same-shape linears (e.g. gate/up, k/v of one layer) into one bmm -- the stock-PyTorch way of
# batching that diagonal must beat. Off by default in torch 2.13 (both options are {}). Measured
# on torch 2.13 (a probe with two independent linears on a (1, 8, 16) input, and the tiny config):
# the pre-grad `batch_linear` matches only 2-D inputs, so it never fires on (B, Q, d) hidden
# states; the post-grad `batch_linear_post_grad` (on aten.mm after the linear is flattened) does,
# but only with min_fuse_set_size lowered from its default 5 (one cell has at most 2-3
# independent same-shape linears). Both are enabled; the table shows which fired.
BATCH_LINEAR_CONFIG = {"pre_grad_fusion_options": {"batch_linear": {"min_fuse_set_size": 2}},
                       "post_grad_fusion_options": {"batch_linear_post_grad": {"min_fuse_set_size": 2}}}


def build(point: Point, base: bool, device: str = "cpu", stacked: bool = False):
    """The benchmark model; ``stacked``: layer weights stored stacked
    (``diagpass.stack_weights_``), read by the diagonal graph without a copy."""
    from diagpass.models.armt import build_armt, randomize_memory_
    from diagpass.models.hf_layers import build_base_model

    sh = point.shape
    dtype = DTYPES[point.dtype]
    if sh.model != "armt" and not base:
        return _build_family(point, dtype, device, stacked)
    common = dict(vocab_size=sh.vocab_size, hidden_size=sh.hidden_size, num_layers=sh.num_layers,
                  num_heads=sh.num_heads, num_kv_heads=sh.num_kv_heads,
                  intermediate_size=sh.intermediate_size)
    if base:
        m = build_base_model("llama", **common, max_positions=max(64, point.tokens), seed=0, dtype=dtype)
    else:
        m = build_armt("llama", **common, segment_size=point.segment_size,
                       num_mem_tokens=point.num_mem_tokens, d_mem=sh.d_mem, seed=0, dtype=dtype)
        randomize_memory_(m)
    m = m.to(device).eval()
    if stacked:
        import diagpass

        diagpass.stack_weights_(m.layers)
    return m


def _build_family(point: Point, dtype, device: str, stacked: bool):
    """The research-family model with ``point.shape.model`` as its memory kind
    (no full-attention base for it; its even-load bound is ``bound.build_family_bound``)."""
    from diagpass.models.family import FamilyConfig, build_family_model

    sh = point.shape
    cfg = FamilyConfig(vocab_size=sh.vocab_size, d_model=sh.hidden_size, n_layers=sh.num_layers, n_heads=sh.num_heads,
                       n_kv_heads=sh.num_kv_heads, d_ff=sh.intermediate_size, ffn_kind="swiglu", norm_kind="rmsnorm",
                       rope=True, segment_size=point.segment_size, num_mem_tokens=point.num_mem_tokens,
                       memory_kind=sh.model, dtype=dtype)
    m = build_family_model(cfg, seed=0).to(device).eval()
    if stacked:
        import diagpass

        diagpass.stack_weights_(m.layers)
    return m


def model_key(mode: str) -> str:
    """Which model a mode runs: modes with the same key share one built model."""
    if mode.startswith("base"):
        return "base"
    return {"diag_stacked": "stacked", "stacked_inline": "stacked", "stacked_wsteps": "stacked", "stacked_whole": "stacked",
            "stacked_fixed_width": "stacked", "stacked_batched": "stacked", "stacked_glue_in": "stacked",
            "stacked_pywrapper": "stacked", "bound": "bound"}.get(mode, "armt")


def build_for_mode(point: Point, mode: str, device: str = "cpu"):
    """``build`` for a mode's key; ``bound`` wraps the plain ARMT (benchmarks.bound)."""
    key = model_key(mode)
    m = build(point, key == "base", device, stacked=key == "stacked")
    if key == "bound":
        from .bound import build_bound, build_family_bound

        m = (build_bound if point.shape.model == "armt" else build_family_bound)(m, inputs(point, device))
    return m


def _with_config(f: Callable, patches: dict) -> Callable:
    """``f`` called under an Inductor config patch: compiles (first call, recompiles after a
    Dynamo reset, the timing worker's warm-cache compile) all see the option; the patch costs
    microseconds per call."""
    import torch._inductor.config as inductor_config

    def call(*args):
        with inductor_config.patch(patches):
            return f(*args)
    return call


def fusion_counts() -> Dict[str, int]:
    """Inductor's group/batch-fusion counters (``counters["inductor"]``, keys ``batch_*`` /
    ``group_*``): how often Optimus fired in this process."""
    from torch._dynamo.utils import counters
    return {k: v for k, v in counters["inductor"].items() if k.startswith(("batch_", "group_"))}


def make_fn(mode: str, model) -> Callable:
    if mode in ("eager", "base_eager"):
        f = model
    elif mode in ("inductor", "bound"):
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "enabled": False})
    elif mode == "inductor_bl":  # the inductor baseline + Optimus batch_linear, nothing else changed
        f = _with_config(torch.compile(model, backend="diagonal", options={"inner": "inductor", "enabled": False}),
                         BATCH_LINEAR_CONFIG)
    elif mode in ("diagonal", "diag_stacked"):
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor"})
    elif mode == "stacked_inline":  # diag_stacked with every call inlined (no shared subgraphs)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "shared_subgraphs": False})
    elif mode == "seq_inline":  # the cost/memory fallback is Dynamo's graph, inline (no segment steps)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "segment_steps": False,
                                                              "shared_sequential": False})
    elif mode == "seq_steps":  # the sequential fallback as one compiled step per segment
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "segment_steps": True})
    elif mode in ("diag_wsteps", "stacked_wsteps"):  # the batched graph as one compiled step per wavefront
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "wavefront_steps": True})
    elif mode == "stacked_fixed_width":  # wavefront steps each compiled for its own width (before symbolic widths)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "symbolic_width": False})
    elif mode == "stacked_batched":  # stored stacks, batched whatever the first calls would time (measuring off)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "measure_band": 1})
    elif mode == "stacked_glue_in":  # stacked_batched with each wavefront's glue in its step (before glue steps)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "measure_band": 1, "glue_steps": False})
    elif mode == "stacked_whole":  # diag_stacked with the batched graph compiled whole (shared subgraphs)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "wavefront_steps": False})
    elif mode == "diag_cached":  # weights stacked once and kept between calls (one more copy of them)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "cache_weight_stacks": True})
    elif mode in ("diag_pywrapper", "stacked_pywrapper"):  # steps with Inductor's Python wrapper (before issue 16's C++ one)
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "step_cpp_wrapper": False})
    elif mode == "rolled":
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "roll": True})
    elif mode == "rolled_glue":
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "roll": True, "compile_glue": True})
    elif mode == "seq_rolled":  # same host loop, one cell per kernel call: isolates batching
        f = torch.compile(model, backend="diagonal", options={"inner": "inductor", "roll": True, "min_group": 10**6})
    elif mode == "diag_aot":
        f = torch.compile(model, backend="diagonal", options={"inner": "aot_eager"})
    elif mode == "base_inductor":
        f = torch.compile(model)
    else:
        raise ValueError(mode)
    if mode.startswith("base"):
        return lambda x: f(input_ids=x).logits
    return f


def inputs(point: Point, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, point.shape.vocab_size, (point.batch, point.tokens), generator=g).to(device)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, x, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn(x)
    _sync(device)
    return time.perf_counter() - t


def _diag_report() -> dict:
    import diagpass
    if not diagpass.reports():
        return {}
    r = diagpass.reports()[-1]
    return {"batched": bool(r.batched), "num_wavefronts": r.num_wavefronts,
            "reason": getattr(r, "reason", None), "measured": r.measured,
            "measured_stacked": r.measured_stacked,
            "passes_s": r.timings.get("passes_s"), "inner_s": r.timings.get("inner_s")}


def compile_modes(point: Point, modes: List[str], device: str = "cpu", log=print, cold: bool = True):
    """Build and compile every mode, first call timed. Returns ({mode: fn}, {mode: entry}, x).

    Dynamo is reset before each compiled mode's first call: Dynamo's cache is per code object
    and does not guard on parameter storage, so without the reset ``diag_stacked`` (a second
    instance of the same model class, same backend options) ran the graph ``diagonal`` had
    traced and its first call timed only the stacked variant's Inductor compile (S=32: 79 s
    instead of Dynamo + passes + that compile). A mode compiled before a reset recompiles on
    its next call; ``rewarm`` does that before in-process timing. ``cold=False`` (the timing
    worker, which only needs the steady state) resets once per point."""
    import torch._dynamo
    torch._dynamo.reset()  # recompile_limit is per code object: fresh state per point
    res: Dict[str, dict] = {}
    x = inputs(point, device)
    fns = {}
    models = {}
    with torch.no_grad():
        for mode in modes:
            key = model_key(mode)
            fused0 = fusion_counts()
            try:
                if key not in models:
                    models[key] = build_for_mode(point, mode, device)
                if cold:
                    torch._dynamo.reset()
                fn = make_fn(mode, models[key])
                first = _timed(fn, x, device)
            except Exception as e:  # record and go on
                log(f"  {mode}: FAILED {type(e).__name__}: {e}")
                res[mode] = {"error": f"{type(e).__name__}: {e}"}
                continue
            entry = {"first_call_s": first}
            if mode in ("inductor", "inductor_bl"):  # did Optimus fire (it must in _bl, not in the other)?
                fused = fusion_counts()
                entry["fusions"] = {k: v - fused0.get(k, 0) for k, v in fused.items() if v != fused0.get(k, 0)}
            settle(fn, x, device)
            if mode in ("diagonal", "diag_stacked", "stacked_wsteps", "stacked_fixed_width", "stacked_batched", "stacked_glue_in", "stacked_whole", "diag_pywrapper", "stacked_pywrapper", "stacked_inline", "seq_inline", "seq_steps", "rolled", "rolled_glue", "seq_rolled", "diag_aot", "inductor", "inductor_bl"):
                entry["diag"] = _diag_report()  # after settling: a measured choice is made by then
            fns[mode] = fn
            res[mode] = entry
            log(f"  {mode:14s} first call {first:8.2f} s" + (f"  {entry.get('diag')}" if "diag" in entry else "")
                + (f"  fusions {entry['fusions']}" if "fusions" in entry else ""))
    return fns, res, x


# a graph whose cost estimate is too close to call times its two variants on its
# first calls (options['measure_band']): 1 untimed + 3 timed calls each
SETTLE_CALLS = 8


def settle(fn: Callable, x, device: str = "cpu") -> None:
    """Warm-up calls until a mode runs what it will run from then on."""
    with torch.no_grad():
        for _ in range(SETTLE_CALLS):
            _timed(fn, x, device)


def rewarm(fns: Dict[str, Callable], x, device: str = "cpu") -> None:
    """Settle every mode after ``compile_modes``' resets (recompiles from warm caches)."""
    for fn in fns.values():
        settle(fn, x, device)


def time_modes(fns: Dict[str, Callable], x, repeats: int, device: str = "cpu") -> Dict[str, List[float]]:
    """`repeats` interleaved rounds (one call of each mode per round, order rotated) under
    torch.no_grad(); seconds per call."""
    samples: Dict[str, List[float]] = {m: [] for m in fns}
    order = list(fns)
    with torch.no_grad():
        for r in range(repeats):
            k = r % max(1, len(order))
            for mode in order[k:] + order[:k]:
                samples[mode].append(_timed(fns[mode], x, device))
    return samples


def measure_point(point: Point, modes: List[str], repeats: int, device: str = "cpu",
                  memory: bool = True, fresh_timing: bool = True, log=print) -> dict:
    """Compile every mode in this process (first call timed: cold when the Inductor cache is
    fresh), then time the steady state: by default in a fresh subprocess that compiles the same
    modes again from the now-warm cache and runs them side by side (`benchmarks.timeworker`).
    Why: two runs that timed in the process that had just compiled the S=32 graphs cold
    (small ARMT-LLaMA, 2 threads) gave Inductor sequential 494-497 ms, warm-cache processes
    328-331 ms. A later fresh-process run showed the machine itself switching into a slow
    regime mid-run (311 -> 489 ms), so the compile's share in that is unproven; a fresh
    process at least gives every mode the same history. ``fresh_timing=False`` times in
    this process (the old behaviour)."""
    fns, res, x = compile_modes(point, modes, device, log)
    samples = None
    if fresh_timing and fns:
        samples = timing_subprocess(point, list(fns), repeats, device, log)
        for mode in fns:
            res[mode]["timed_in"] = "fresh process, warm cache"
    if samples is None:
        rewarm(fns, x, device)  # compile_modes reset Dynamo between modes
        samples = time_modes(fns, x, repeats, device)
        for mode in fns:
            res[mode]["timed_in"] = "compiling process"
    for mode, s in samples.items():
        res[mode].update(median_ms=1e3 * statistics.median(s), min_ms=1e3 * min(s),
                         samples_ms=[1e3 * v for v in s])
        # compile time = first call minus one steady-state call
        res[mode]["compile_s"] = max(0.0, res[mode]["first_call_s"] - statistics.median(s))
    if memory:
        for mode in fns:
            res[mode].update(memory_subprocess(point, mode, device, log))
    return {"point": point.to_dict(), "label": point.label, "modes": res}


def _worker(module: str, args: List[str], tag: str, log) -> Optional[dict]:
    cmd = [sys.executable, "-m", module, *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        log(f"  {module}: timed out")
        return None
    line = [l for l in out.stdout.splitlines() if l.startswith(tag + " ")]
    if not line:
        log(f"  {module} failed: {out.stderr[-400:]}")
        return None
    return json.loads(line[-1][len(tag) + 1:])


def timing_subprocess(point: Point, modes: List[str], repeats: int, device: str, log=print):
    samples = _worker("benchmarks.timeworker",
                      [json.dumps(point.to_dict()), str(repeats), device, str(torch.get_num_threads()), *modes],
                      "TIME", log)
    if samples is None:
        log("  timing subprocess failed: timing in this process instead")
    return samples


def memory_subprocess(point: Point, mode: str, device: str, log=print) -> dict:
    d = _worker("benchmarks.memworker", [json.dumps(point.to_dict()), mode, device], "MEM", log)
    if d is not None:
        log(f"  {mode:14s} memory {d}")
    return d or {}
