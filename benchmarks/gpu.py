"""python -m benchmarks.gpu [--dry-run] [--out DIR] [--budget-s S] — the prepared GPU run (issue 16).

One script, at most ~8 minutes on one H200 (the budget skips what would not fit):
  1. checks: diagonal vs eager on the device, a small ARMT-LLaMA (GQA) with weights stored
     stacked: fp32 within rtol=atol=1e-5; bf16 within the sequential compiled model's own
     distance from eager, measured side by side (2x, the project's rule; or, failing that,
     within 2x of eager's / sequential's own error against an fp64 copy);
  2. kernels: the kernels Inductor generated for each timed mode's compile
     (``torch._inductor.metrics.generated_kernel_count``, counted with a fresh Inductor cache:
     a cache hit generates none; Triton on CUDA, C++ on CPU) and, on CUDA, the kernels one
     steady-state call launches (profiler);
  3. timing: the LLaMA-1B shape (d=2048, L=16, GQA 32/8, ffn 8192, bf16, batch 1), 1024- and
     512-token segments + 128 memory tokens at 4K, 32K, 131K tokens: Inductor sequential vs
     diagonal (weights stored stacked, ``diagpass.stack_weights_``) vs the full-attention HF
     LLaMA without memory over the whole input (Inductor; an out-of-memory is recorded).
     CUDA events, warm-ups, interleaved rounds, medians. Points run smallest first; a point
     whose estimate (compile seconds per cell and run seconds per token measured on the
     points before) would overrun the budget is skipped and the reason recorded.
Output: ``gpu.json`` and ``gpu.md`` in --out (default benchmarks/results/), rewritten after
every step so a killed run keeps what it measured. Exit status 1 if a check failed.

``--dry-run``: the same code path on CPU with a tiny shape, in seconds (CI runs it). Its
compiles use inner ``aot_eager`` unless ``--inner inductor`` (Inductor on this 2-core CPU
takes minutes even for the tiny shape), so its kernel count reads "n/a"; its numbers are
a smoke test, not results.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

# ---------------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    d_mem: int

    def kwargs(self) -> dict:
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                    num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    intermediate_size=self.intermediate_size)


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    dtype: str  # of the timed points
    inner: str  # the inner compiler of every compiled mode
    shape: ModelShape  # timed
    num_mem_tokens: int
    points: tuple  # (segment size T, total tokens N), smallest first
    check_shape: ModelShape
    check_segment: tuple  # (T, M, S)
    repeats: int
    warmup: int
    budget_s: float


LLAMA_1B = ModelShape(2048, 16, 32, 8, 8192, 32000, 64)


def gpu_plan(budget_s: float, inner: str) -> Plan:
    points = tuple((T, N) for N in (4096, 32768, 131072) for T in (1024, 512))
    return Plan("cuda", "bf16", inner, LLAMA_1B, 128, points,
                ModelShape(256, 4, 4, 2, 512, 512, 16), (64, 16, 4), repeats=7, warmup=2, budget_s=budget_s)


def dry_plan(budget_s: float, inner: str) -> Plan:
    tiny = ModelShape(32, 2, 4, 2, 64, 64, 4)
    # S >= 4: with S = 3 no wavefront holds two identical cells (segment 0 and the last differ)
    return Plan("cpu", "bf16", inner, tiny, 2, ((8, 32), (4, 24)), tiny, (8, 2, 4),
                repeats=2, warmup=1, budget_s=budget_s)


# -------------------------------------------------------------------------------- helpers


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_memory_model(shape: ModelShape, T: int, M: int, dtype: str, device: str, stacked: bool = True):
    """ARMT-LLaMA from a config, random weights (no hub), memory made non-trivial; layer
    weights stored stacked (the README's fast path: diagonal reads them without a copy)."""
    import diagpass
    from diagpass.models.armt import build_armt, randomize_memory_

    m = build_armt("llama", **shape.kwargs(), segment_size=T, num_mem_tokens=M, d_mem=shape.d_mem,
                   seed=0, dtype=_dtype(dtype))
    randomize_memory_(m)
    m = m.to(device).eval()
    if stacked:
        diagpass.stack_weights_(m.layers)
    return m


def build_full_attention(shape: ModelShape, max_tokens: int, dtype: str, device: str):
    """The HF LLaMA without memory: full causal attention over the whole input."""
    from diagpass.models.hf_layers import build_base_model

    m = build_base_model("llama", **shape.kwargs(), max_positions=max(64, max_tokens), seed=0, dtype=_dtype(dtype))
    return m.to(device).eval()


def token_ids(vocab: int, N: int, device: str):
    import torch
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (1, N), generator=g).to(device)


def compiled(model, mode: str, inner: str) -> Callable:
    """seq: the diagonal backend with the pass off (same graph, same inner compiler);
    diagonal: the backend's defaults; base: the HF model under the same inner compiler."""
    import torch
    if mode == "seq":
        return torch.compile(model, backend="diagonal", options={"inner": inner, "enabled": False})
    if mode == "diagonal":
        return torch.compile(model, backend="diagonal", options={"inner": inner})
    if mode == "base":
        f = torch.compile(model, backend="inductor" if inner == "inductor" else inner)
        return lambda x: f(input_ids=x).logits
    raise ValueError(mode)


def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, x, device: str) -> float:
    """Seconds of one call: CUDA events on the GPU (device time between the events), the host
    clock on CPU; synchronised before and after."""
    import torch
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def interleaved(fns: Dict[str, Callable], x, repeats: int, device: str) -> Dict[str, List[float]]:
    """``repeats`` rounds, one call of each mode per round, order rotated each round, so a
    drift of the machine (clocks, other work) hits every mode alike."""
    import torch
    order, out = list(fns), {m: [] for m in fns}
    with torch.no_grad():
        for r in range(repeats):
            k = r % len(order)
            for m in order[k:] + order[:k]:
                out[m].append(time_call(fns[m], x, device))
    return out


def kernel_count() -> int:
    from torch._inductor import metrics
    return metrics.generated_kernel_count


def cache_hits() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"]


def kernels_entry(before: int, hits_before: int, inner: str, device: str) -> dict:
    """What the compile just generated, said honestly: no number where Inductor did not run."""
    if inner != "inductor":
        return {"generated_kernels": None, "note": f"n/a (inner {inner}: no Inductor kernels)"}
    n, hits = kernel_count() - before, cache_hits() - hits_before
    kind = "triton" if device == "cuda" else "cpp (n/a: no Triton on CPU)"
    e = {"generated_kernels": n, "kind": kind}
    if hits:
        e["note"] = f"{hits} FX graph cache hit(s): cached graphs generate no kernels, the count is low"
    return e


def launches_per_call(fn, x, device: str) -> Optional[int]:
    """CUDA kernels one call launches (profiler); None on CPU."""
    if device != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def batched_graphs() -> int:
    """Graphs the diagonal backend batched so far (its own counters, as diagpass.testing reads)."""
    from diagpass.counters import counters
    return counters["backend"]["graphs_batched"]


def max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------------- checks


def check_fp32(plan: Plan) -> dict:
    """diagonal vs eager in fp32 at rtol=atol=1e-5 (the correctness contract)."""
    import torch
    T, M, S = plan.check_segment
    model = build_memory_model(plan.check_shape, T, M, "fp32", plan.device)
    x = token_ids(plan.check_shape.vocab_size, T * S, plan.device)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        b0 = batched_graphs()
        got = compiled(model, "diagonal", plan.inner)(x)
    ok = torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    return {"check": "fp32 diagonal vs eager", "rtol": 1e-5, "atol": 1e-5, "max_abs_err": max_err(got, ref),
            "batched": batched_graphs() > b0, "passed": bool(ok) and batched_graphs() > b0}


def check_bf16(plan: Plan) -> dict:
    """bf16: diagonal's distance from eager against the sequential compiled model's, measured
    side by side; passes at <= 2x it, or else at <= 2x the larger of eager's and sequential's
    own error against an fp64 copy (where sequential happens to round like eager)."""
    import torch
    from diagpass.testing import float64_copy

    T, M, S = plan.check_segment
    model = build_memory_model(plan.check_shape, T, M, "bf16", plan.device)
    x = token_ids(plan.check_shape.vocab_size, T * S, plan.device)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        seq = compiled(model, "seq", plan.inner)(x)
        torch._dynamo.reset()
        b0 = batched_graphs()
        diag = compiled(model, "diagonal", plan.inner)(x)
        batched = batched_graphs() > b0
        exact = float64_copy(model)(x)
    d_seq, d_diag = max_err(seq, eager), max_err(diag, eager)
    e_eager, e_seq, e_diag = (max_err(t, exact) for t in (eager, seq, diag))
    side_by_side = d_diag <= 2 * d_seq
    vs_fp64 = e_diag <= 2 * max(e_eager, e_seq)
    return {"check": "bf16 diagonal vs eager, against sequential compiled vs eager",
            "seq_vs_eager": d_seq, "diag_vs_eager": d_diag,
            "fp64_err": {"eager": e_eager, "seq": e_seq, "diag": e_diag},
            "rule": "diag_vs_eager <= 2 x seq_vs_eager, or diag's fp64 error <= 2 x max(eager's, seq's)",
            "batched": batched, "passed": batched and (side_by_side or vs_fp64)}


def run_checks(plan: Plan, log) -> List[dict]:
    out = []
    for check in (check_fp32, check_bf16):
        t = time.perf_counter()
        try:
            r = check(plan)
        except Exception as e:  # a failed check is a result, not a crash
            r = {"check": check.__name__, "passed": False, "error": f"{type(e).__name__}: {e}"}
        r["seconds"] = time.perf_counter() - t
        log(f"check {r['check']}: {'PASS' if r['passed'] else 'FAIL'} {r}")
        out.append(r)
    return out


# --------------------------------------------------------------------------------- timing


class Budget:
    """Time left, and an estimate of a point from what the points before it measured:
    compile seconds per cell (S * L cells per memory-model compile) and steady seconds per
    token and call. The first point is always run: nothing is known before it."""

    def __init__(self, total_s: float):
        self.t0, self.total_s = time.perf_counter(), total_s
        self.compile_per_cell: List[float] = []
        self.run_per_token: List[float] = []

    def left(self) -> float:
        return self.total_s - (time.perf_counter() - self.t0)

    def learn(self, cells: int, compile_s: float, tokens: int, call_s: float) -> None:
        self.compile_per_cell.append(compile_s / cells)
        self.run_per_token.append(call_s / tokens)

    def estimate(self, cells: int, tokens: int, calls: int) -> Optional[float]:
        if not self.compile_per_cell:
            return None
        return max(self.compile_per_cell) * cells + max(self.run_per_token) * tokens * calls


def time_point(plan: Plan, T: int, N: int, models: dict, log) -> dict:
    """Compile (first call, kernels counted), compare, warm up and time one point."""
    import torch
    S, M, L = N // T, plan.num_mem_tokens, plan.shape.num_layers
    x = token_ids(plan.shape.vocab_size, N, plan.device)
    torch._dynamo.reset()  # recompile_limit is per code object; each point traces afresh
    fns, entry = {}, {"tokens": N, "segment": T, "mem_tokens": M, "segments": S, "cells": S * L, "modes": {}}
    for mode in ("seq", "diagonal", "base"):
        model = models["base"] if mode == "base" else models[T]
        fn = compiled(model, mode, plan.inner)
        k0, h0, b0 = kernel_count(), cache_hits(), batched_graphs()
        e = entry["modes"][mode] = {}
        try:
            with torch.no_grad():
                if plan.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                out = fn(x)
                sync(plan.device)
                e["first_call_s"] = time.perf_counter() - t
                for _ in range(plan.warmup):
                    fn(x)
                if plan.device == "cuda":
                    e["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError as err:  # the base model at long inputs: recorded, not fatal
            e["error"] = f"out of memory: {str(err)[:200]}"
            torch.cuda.empty_cache()
            log(f"  {mode}: OOM")
            continue
        except Exception as err:  # one mode failing must not lose the others' numbers
            e["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"  {mode}: FAILED {e['error']}")
            continue
        e["kernels"] = kernels_entry(k0, h0, plan.inner, plan.device)
        if mode == "diagonal":
            e["batched"] = batched_graphs() > b0
            if "_seq_out" in entry:
                entry["diag_vs_seq_max_abs"] = max_err(out, entry.pop("_seq_out"))
        elif mode == "seq":
            entry["_seq_out"] = out
        e["launches_per_call"] = launches_per_call(fn, x, plan.device)
        fns[mode] = fn
        log(f"  {mode}: first call {e['first_call_s']:.1f} s, kernels {e['kernels']}")
    entry.pop("_seq_out", None)
    samples = interleaved(fns, x, plan.repeats, plan.device)
    for mode, s in samples.items():
        entry["modes"][mode].update(median_ms=1e3 * statistics.median(s), samples_ms=[1e3 * v for v in s])
        entry["modes"][mode]["compile_s"] = max(0.0, entry["modes"][mode]["first_call_s"] - statistics.median(s))
    seq, diag = (entry["modes"].get(m, {}).get("median_ms") for m in ("seq", "diagonal"))
    if seq and diag:
        entry["speedup"] = seq / diag
    return entry


def point_cost(plan: Plan, budget: Budget, T: int, N: int) -> Optional[float]:
    """Estimated seconds for a point: two memory-model compiles + the base's (counted as one
    more), and every timed call (first, warm-up, rounds) of three modes."""
    cells = (N // T) * plan.shape.num_layers
    calls = 3 * (1 + plan.warmup + plan.repeats + 1)
    return budget.estimate(3 * cells, N, calls)


def run_points(plan: Plan, result: dict, write, log) -> None:
    budget = Budget(plan.budget_s - result["meta"]["elapsed_before_timing_s"])
    models = {}
    for T, N in plan.points:
        est = point_cost(plan, budget, T, N)
        if est is not None and est > budget.left():
            why = f"estimated {est:.0f} s > {budget.left():.0f} s left of the budget"
            result["skipped"].append({"tokens": N, "segment": T, "reason": why})
            log(f"SKIP N={N} T={T}: {why}")
            write(result)
            continue
        log(f"[{plan.budget_s - budget.left():6.1f} s] point N={N} T={T}+{plan.num_mem_tokens}")
        t = time.perf_counter()
        if T not in models:
            models.clear()  # one memory model at a time on the device: the 1B weights are 2.5 GB
            models[T] = build_memory_model(plan.shape, T, plan.num_mem_tokens, plan.dtype, plan.device)
        if "base" not in models:
            models["base"] = build_full_attention(plan.shape, max(n for _, n in plan.points), plan.dtype, plan.device)
        build_s = time.perf_counter() - t
        entry = time_point(plan, T, N, models, log)
        entry["build_s"] = build_s
        compile_s = sum(m.get("compile_s", 0.0) for m in entry["modes"].values())
        call_s = max((m.get("median_ms", 0.0) for m in entry["modes"].values()), default=0.0) / 1e3
        budget.learn(3 * entry["cells"], compile_s + build_s, N, call_s)
        result["points"].append(entry)
        write(result)


# --------------------------------------------------------------------------------- output


def _ms(m: dict) -> str:
    if "error" in m:
        return m["error"][:40]
    return "—" if m.get("median_ms") is None else f"{m['median_ms']:.1f}"


def _kern(m: dict) -> str:
    k = m.get("kernels") or {}
    n = k.get("generated_kernels")
    txt = "n/a" if n is None else str(n)
    if m.get("launches_per_call") is not None:
        txt += f" / {m['launches_per_call']}"
    return txt


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# diagpass GPU run (`python -m benchmarks.gpu`)", "",
             f"- {meta['date']}, torch {meta['torch']}, device {meta['device_name']}, inner {meta['inner']}, "
             f"budget {meta['budget_s']:.0f} s, total {meta.get('total_s', float('nan')):.0f} s",
             f"- command: `{meta['command']}`"]
    if meta["dry_run"]:
        lines.append("- **DRY RUN** (CPU, tiny shape): a smoke test of the script, not a result.")
    lines += ["", "## Checks", "", "| check | passed | details |", "|---|---|---|"]
    for c in result["checks"]:
        details = {k: v for k, v in c.items() if k not in ("check", "passed")}
        lines.append(f"| {c['check']} | {c['passed']} | `{json.dumps(details, default=str)[:300]}` |")
    lines += ["", "## Timing (median ms of interleaved rounds; kernels: generated by the compile / "
              "launched per call)", "",
              f"| tokens | segment + mem | S | sequential ({meta['inner']}) | diagonal | speedup | full-attn base | "
              "kernels seq | kernels diag | compile s seq / diag | diag vs seq max abs |",
              "|---:|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for p in result["points"]:
        m = p["modes"]
        seq, diag, base = (m.get(k, {}) for k in ("seq", "diagonal", "base"))
        sp = f"{p['speedup']:.2f}x" if "speedup" in p else "—"
        comp = " / ".join(f"{x.get('compile_s', float('nan')):.0f}" for x in (seq, diag))
        dv = p.get("diag_vs_seq_max_abs")
        lines.append(f"| {p['tokens']} | {p['segment']}+{p['mem_tokens']} | {p['segments']} | {_ms(seq)} | "
                     f"{_ms(diag)} | {sp} | {_ms(base)} | {_kern(seq)} | {_kern(diag)} | {comp} | "
                     f"{'—' if dv is None else f'{dv:.3g}'} |")
    for s in result["skipped"]:
        lines.append(f"| {s['tokens']} | {s['segment']}+{result['meta']['num_mem_tokens']} | — | skipped: "
                     f"{s['reason']} ||||||||")
    return "\n".join(lines) + "\n"


def writer(out_dir: str) -> Callable[[dict], None]:
    def write(result: dict) -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gpu.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(out_dir, "gpu.md"), "w") as f:
            f.write(markdown(result))
    return write


# ----------------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, seconds: the CI smoke test")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=None, help="default 450 (GPU), 120 (dry run)")
    ap.add_argument("--inner", choices=["inductor", "aot_eager"], default=None,
                    help="default inductor (GPU), aot_eager (dry run)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    # A fresh Inductor cache before torch is imported: cache hits would generate no kernels
    # (the count) and compile nothing (the compile times).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="diagpass_gpu_inductor_")
    import torch

    inner = args.inner or ("aot_eager" if args.dry_run else "inductor")
    if args.dry_run:
        plan = dry_plan(args.budget_s or 120.0, inner)
    else:
        if not torch.cuda.is_available():
            print("benchmarks.gpu: no CUDA device (use --dry-run for the CPU smoke test)", file=sys.stderr)
            return 2
        plan = gpu_plan(args.budget_s or 450.0, inner)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    write = writer(args.out)
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                       "device": plan.device, "dry_run": args.dry_run, "inner": inner, "budget_s": plan.budget_s,
                       "device_name": torch.cuda.get_device_name() if plan.device == "cuda" else "cpu",
                       "num_mem_tokens": plan.num_mem_tokens, "dtype": plan.dtype,
                       "shape": dataclasses.asdict(plan.shape),
                       "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)},
              "checks": [], "points": [], "skipped": []}
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks at 1e-5 need full fp32 matmuls
    result["checks"] = run_checks(plan, log)
    result["meta"]["elapsed_before_timing_s"] = time.perf_counter() - t0
    write(result)
    run_points(plan, result, write, log)
    result["meta"]["total_s"] = time.perf_counter() - t0
    write(result)
    print(markdown(result))
    return 0 if all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
