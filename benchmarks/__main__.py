"""python -m benchmarks [--quick | --config NAME ...] — see benchmarks/__init__.py."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small configs, < 5 min on 2 CPU cores")
    ap.add_argument("--config", action="append", help="named config (repeatable); see --list")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--segments", type=int, nargs="+", help="override the S sweep of the configs")
    ap.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], help="override dtypes")
    ap.add_argument("--modes", nargs="+", help="subset of: eager inductor inductor_bl diagonal diag_stacked stacked_inline seq_inline seq_steps diag_wsteps stacked_wsteps stacked_fixed_width stacked_batched stacked_glue_in stacked_whole diag_cached diag_pywrapper stacked_pywrapper rolled rolled_glue seq_rolled diag_aot bound base_eager base_inductor")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses")
    ap.add_argument("--memory", action="store_true", help="run the memory subprocesses even with --quick")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-in-process", action="store_true",
                    help="time the steady state in the compiling process (default: a fresh process "
                         "that loads the compiled modes from the warm cache; see runner.measure_point)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--stem", default="latest", help="output file stem (latest -> latest.md/json, latency.png)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="reuse the Inductor cache (default: a fresh TORCHINDUCTOR_CACHE_DIR so compile times are cold)")
    ap.add_argument("--note", action="append", default=[], help="free-text note for the report")
    args = ap.parse_args(argv)

    if not args.keep_cache:  # before torch is imported
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="diagpass_bench_inductor_")

    from .configs import CONFIGS, FULL, QUICK
    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name:15s} {c.description}; S={list(c.segments)} T={list(c.segment_sizes)} {list(c.dtypes)}")
        return 0

    import torch
    from . import report, runner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.config or (QUICK if args.quick else FULL)
    repeats = args.repeats or (11 if args.quick else 9)
    modes = args.modes or (runner.QUICK_MODES if args.quick else runner.DEFAULT_MODES)
    notes, results = list(args.note), []
    if args.time_in_process:
        notes.append("--time-in-process: steady state timed in the process that compiled (compile leftovers "
                     "slow some modes more than others)")
    if args.keep_cache:
        notes.append("--keep-cache: Inductor cache reused, compile times may be WARM (cache hits), not cold")
    meta = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "repeats": repeats, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": notes}
    t_start = time.perf_counter()
    for name in names:
        cfg = CONFIGS[name]
        for point in cfg.points(args.segments, args.dtype):
            if point.shape.gpu_only and device != "cuda":
                note = f"{name}: {point.label} skipped (GPU-only shape, device is {device})"
                if note not in notes:
                    notes.append(note)
                print("SKIP", note)
                continue
            print(f"[{time.perf_counter() - t_start:7.1f} s] {name}: {point.label}", flush=True)
            results.append(runner.measure_point(point, modes, repeats, device, memory=not args.no_memory and (args.memory or not args.quick),
                                                 fresh_timing=not args.time_in_process))
            report.write(results, meta, args.out, args.stem)  # partial results survive a kill
    meta["total_s"] = time.perf_counter() - t_start
    md = report.write(results, meta, args.out, args.stem)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
