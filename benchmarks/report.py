"""Markdown / JSON / PNG output."""
from __future__ import annotations

import json
import os
from typing import List

MODE_NAMES = {
    "eager": "eager sequential",
    "inductor": "Inductor sequential",
    "inductor_bl": "Inductor sequential + Optimus batch_linear (pre+post grad)",
    "diagonal": "diagonal (Inductor)",
    "diag_stacked": "diagonal (Inductor), weights stored stacked",
    "seq_inline": "diagonal (Inductor), segment_steps=False: the sequential fallback inline",
    "seq_steps": "diagonal (Inductor), segment_steps=True (default): the sequential fallback one step per segment",
    "stacked_inline": "diagonal (Inductor), weights stored stacked, calls inlined (shared subgraphs off)",
    "diag_cached": "diagonal (Inductor), cache_weight_stacks",
    "diag_aot": "diagonal (aot_eager)",
    "diag_pywrapper": "diagonal (Inductor), steps with the Python wrapper (step_cpp_wrapper=False)",
    "stacked_pywrapper": "diagonal (Inductor), weights stored stacked, steps with the Python wrapper",
    "stacked_batched": "diagonal (Inductor), weights stored stacked, batched (measure_band=1: not timed against sequential)",
    "stacked_glue_in": "diagonal (Inductor), weights stored stacked, batched, each wavefront's glue in its step (glue_steps=False)",
    "stacked_fixed_width": "diagonal (Inductor), weights stored stacked, each width's wavefront step its own (symbolic_width=False)",
    "rolled": "diagonal rolled (Inductor kernels, compiled once)",
    "rolled_glue": "diagonal rolled, glue compiled too (compile_glue)",
    "seq_rolled": "sequential rolled (one cell per kernel call)",
    "bound": "even-load bound (1 segment at batch B*S, Inductor)",
    "base_eager": "full-attn base, eager",
    "base_inductor": "full-attn base, Inductor",
}


def _f(v, fmt="{:.1f}"):
    return "—" if v is None else fmt.format(v)


def _vs(value, ref) -> str:
    """``value (value/ref x)``; the sequential run's own ratio included, so columns align."""
    if value is None:
        return "—"
    return f"{value:.1f}" + (f" ({value / ref:.2f}x)" if ref else "")


NOT_SCHEDULES = ("eager", "inductor", "bound", "base_eager", "base_inductor")


def bound_share(t_seq, t_mode, t_bound):
    """Share of the even-load bound's gain a mode takes: (t_seq - t_mode) / (t_seq - t_bound).
    1 = as fast as the bound, 0 = no faster than sequential, < 0 = slower. None when a time is
    missing or the bound is not faster than sequential (no gain to share)."""
    if None in (t_seq, t_mode, t_bound) or t_seq <= t_bound:
        return None
    return (t_seq - t_mode) / (t_seq - t_bound)


def paired_speedup(seq: dict, mode: dict):
    """Median over rounds of the same-round ratio t_seq / t_mode (None without samples)."""
    rs, ms = seq.get("samples_ms"), mode.get("samples_ms")
    if not rs or not ms:
        return None
    pr = sorted(x / y for x, y in zip(rs, ms))
    return pr[len(pr) // 2]


def _share_text(name: str, modes: dict) -> str:
    if name in NOT_SCHEDULES:
        return ""
    sh = bound_share(modes.get("inductor", {}).get("median_ms"), modes[name].get("median_ms"),
                     modes.get("bound", {}).get("median_ms"))
    return "" if sh is None else f"{100 * sh:.0f}%"


def _fusion_text(m: dict) -> str:
    f = m.get("fusions")
    if f is None:
        return ""
    return "Optimus: " + (", ".join(f"{k} x{v}" for k, v in sorted(f.items())) or "none fired")


def markdown(results: List[dict], meta: dict) -> str:
    lines = [f"# diagpass benchmarks", "",
             f"- torch {meta.get('torch')}, device {meta.get('device')}, threads {meta.get('threads')}, "
             f"repeats {meta.get('repeats')}, {meta.get('date')}",
             f"- command: `{meta.get('command')}`",
             "- latency: median of interleaved steady-state calls under torch.no_grad(); "
             "compile = first call minus median call; speedup = Inductor sequential / mode (median latencies; paired = median over rounds of the same-round ratio); "
             "memory (per-mode subprocess, one steady-state call): peak tensors = weights and buffers "
             "(each storage once) + the peak of tensors the call allocates (profiler memory timeline); "
             "peak RSS = Linux VmHWM of the call, reset via /proc/self/clear_refs after returning freed "
             "heap to the OS (gc + malloc_trim): the whole process, compiled code and compile "
             "leftovers included; compile peak = VmHWM of the first call above the RSS before it. "
             "bound share = (t_seq - t_mode) / (t_seq - t_bound): the share of the even-load bound's gain "
             "(one segment at batch B*S, same tokens; no recurrent schedule beats it) the mode takes.", ""]
    for note in meta.get("notes", []):
        lines.append(f"- NOTE: {note}")
    lines.append("")
    lines.append("| point | mode | median ms | min ms | first call s | compile s | peak tensors MiB (vs seq) | peak RSS MiB (vs seq) | compile peak MiB | diag: batched / wavefronts | speedup vs Inductor seq | bound share |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        modes = r["modes"]
        ref_seq = modes.get("inductor", {})
        ref = ref_seq.get("median_ms")
        for name, m in modes.items():
            if "error" in m:
                lines.append(f"| {r['label']} | {MODE_NAMES.get(name, name)} | error: {m['error'][:80]} |||||||||")
                continue
            d = m.get("diag") or {}
            dtxt = f"{d.get('batched')} / {d.get('num_wavefronts')}" if d and name not in ("inductor", "inductor_bl") else ""
            measured = d.get("measured") or d.get("measured_stacked")
            if measured:  # timed against the sequential graph on the first calls ({}: never timed)
                dtxt += f" (measured: runs {measured.get('chose', '?')})"
            dtxt = dtxt or _fusion_text(m)
            sp = f"{ref / m['median_ms']:.2f}x" if ref and m.get("median_ms") else "—"
            pr = paired_speedup(modes.get("inductor", {}), m) if name != "inductor" else None
            if pr is not None:
                sp += f" (paired {pr:.2f}x)"
            tensors, rss = (_vs(m.get(k), ref_seq.get(k)) for k in ("tensor_peak_mb", "steady_hwm_mb"))
            lines.append(
                f"| {r['label']} | {MODE_NAMES.get(name, name)} | {_f(m.get('median_ms'))} | {_f(m.get('min_ms'))} | "
                f"{_f(m.get('first_call_s'), '{:.1f}')} | {_f(m.get('compile_s'), '{:.1f}')} | "
                f"{tensors} | {rss} | {_f(m.get('compile_peak_mb'))} | {dtxt} | {sp} | {_share_text(name, modes)} |")
    return "\n".join(lines) + "\n"


def write(results: List[dict], meta: dict, outdir: str, stem: str = "latest") -> str:
    os.makedirs(outdir, exist_ok=True)
    md = markdown(results, meta)
    with open(os.path.join(outdir, f"{stem}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(outdir, f"{stem}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    try:
        plot(results, os.path.join(outdir, "latency.png" if stem == "latest" else f"{stem}_latency.png"))
    except Exception as e:  # plotting is optional
        print(f"plot failed: {e}")
    return md


def plot(results: List[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per (shape, segment size, dtype) series with >= 1 point; x = tokens
    series = {}
    for r in results:
        p = r["point"]
        key = (p["shape"]["name"], p["segment_size"], p["num_mem_tokens"], p["dtype"], p["batch"])
        series.setdefault(key, []).append(r)
    n = len(series)
    if not n:
        return
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (key, rs) in zip(axes[0], series.items()):
        rs = sorted(rs, key=lambda r: r["point"]["segments"] * r["point"]["segment_size"])
        modes = []
        for r in rs:
            for m in r["modes"]:
                if m not in modes:
                    modes.append(m)
        for m in modes:
            xs = [r["point"]["segments"] * r["point"]["segment_size"] for r in rs if r["modes"].get(m, {}).get("median_ms")]
            ys = [r["modes"][m]["median_ms"] for r in rs if r["modes"].get(m, {}).get("median_ms")]
            if xs:
                ax.plot(xs, ys, marker="o", label=MODE_NAMES.get(m, m),
                        linestyle="--" if m.startswith("base") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("forward latency, ms (median)")
        ax.set_title(f"{key[0]} T={key[1]}+{key[2]} {key[3]} B={key[4]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
