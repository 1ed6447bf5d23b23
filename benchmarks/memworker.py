"""Peak-memory worker: one mode of one point in a fresh process (see benchmarks/__init__.py).

python -m benchmarks.memworker '<point json>' MODE DEVICE  -> prints 'MEM {json}'
"""
import ctypes
import ctypes.util
import gc
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


def _release_freed_heap():
    """Return freed heap pages to the OS, so RSS measures live memory. glibc keeps what the
    compile (and stack_weights_'s replaced per-layer weights) freed: without this, a process
    that compiled more held up to 1.3x the RSS of one that compiled less (session 3's
    "unexplained" stacked-weights RSS) with the same live tensors."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters' and buffers' storages, each storage once (stacked weights are
    views of one storage per name)."""
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _tensor_peak_bytes(fn, x) -> int:
    """Peak bytes of tensors allocated during one call and live at once: the profiler's
    memory timeline (CREATE / DESTROY of every allocation, in time order) replayed."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn(x)
    live = peak = 0
    for _, action, _, size in sorted(MemoryProfile(prof.profiler.kineto_results).timeline, key=lambda r: r[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def main():
    from .configs import Point
    from .runner import build_for_mode, inputs, make_fn, settle

    point = Point.from_dict(json.loads(sys.argv[1]))
    mode, device = sys.argv[2], sys.argv[3]
    torch.set_num_threads(torch.get_num_threads())
    with torch.no_grad():
        model = build_for_mode(point, mode, device)
        x = inputs(point, device)
        fn = make_fn(mode, model)
        out = {}
        if device == "cuda":
            torch.cuda.synchronize()
            fn(x)
            settle(fn, x, device)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(x)
            torch.cuda.synchronize()
            out["steady_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            out["steady_hwm_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["tensor_peak_mb"] = out["steady_hwm_mb"]  # the caching allocator counts tensors only
        else:
            ok = _reset_hwm()
            rss0 = _status("VmRSS")
            fn(x)
            out["compile_peak_mb"] = _status("VmHWM") - rss0 if ok else None
            settle(fn, x, device)  # a measured graph has made its choice by then
            out["rss_untrimmed_mb"] = _status("VmRSS")
            _release_freed_heap()
            rss1 = _status("VmRSS")
            ok = _reset_hwm()
            fn(x)
            out["steady_peak_mb"] = _status("VmHWM") - rss1 if ok else None
            # the "peak memory of the run": RSS high-water of a steady call, absolute
            out["steady_hwm_mb"] = _status("VmHWM") if ok else None
            out["rss_after_mb"] = _status("VmRSS")
            # what the pass controls: weights (each storage once) + the tensors one call allocates
            try:
                out["tensor_peak_mb"] = (_model_bytes(model) + _tensor_peak_bytes(fn, x)) / 2**20
            except Exception as e:  # private profiler API: report, don't fail the worker
                print(f"tensor peak unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    print("MEM " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
