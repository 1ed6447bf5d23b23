"""Peak-memory worker: one mode of one point in a fresh process (see benchmarks/__init__.py).

python -m benchmarks.memworker '<point json>' MODE DEVICE  -> prints 'MEM {json}'
"""
import json
import sys

import torch


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    from .configs import Point
    from .runner import build, inputs, make_fn

    point = Point.from_dict(json.loads(sys.argv[1]))
    mode, device = sys.argv[2], sys.argv[3]
    torch.set_num_threads(torch.get_num_threads())
    with torch.no_grad():
        model = build(point, mode.startswith("base"), device, stacked=mode == "diag_stacked")
        x = inputs(point, device)
        fn = make_fn(mode, model)
        out = {}
        if device == "cuda":
            torch.cuda.synchronize()
            fn(x); fn(x)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(x)
            torch.cuda.synchronize()
            out["steady_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            ok = _reset_hwm()
            rss0 = _status("VmRSS")
            fn(x)
            out["compile_peak_mb"] = _status("VmHWM") - rss0 if ok else None
            fn(x)
            rss1 = _status("VmRSS")
            ok = _reset_hwm()
            fn(x)
            out["steady_peak_mb"] = _status("VmHWM") - rss1 if ok else None
            out["rss_after_mb"] = _status("VmRSS")
    print("MEM " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
