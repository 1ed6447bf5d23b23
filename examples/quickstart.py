"""Quickstart: an ARMT over a tiny LLaMA, compiled with backend="diagonal".

    python examples/quickstart.py                      # Inductor (first call: minutes on 2 cores)
    python examples/quickstart.py --plot grid.png      # also save the S x L grid picture
    python examples/quickstart.py --tiny --inner eager # seconds: checks the script, times nothing real

Prints the machine, the explain report (the S x L grid and its wavefronts),
checks the compiled model equals the eager one, and times eager, the
sequential compiled model and the diagonal one side by side: the ratio
against the sequential compiled model first, because that is the claim
(diagonal batching vs the same compiler without it), not the ratio against
eager. The sequential model is the same backend with ``enabled=False``: the
same inner compiler and settings, no rewrite. Rounds are interleaved so that
a machine that slows down mid-run slows all three alike.

No `import diagpass` is needed for torch.compile to find the backend; we
import it for explain(), reports() and the reference model.
"""

import argparse
import os
import platform
import statistics
import time

import torch

import diagpass
from diagpass.models import build_armt, randomize_memory_


def machine() -> str:
    """CPU model, cores, torch version and intra-op threads: timings mean nothing without them."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def first_call(fn, ids):
    t0 = time.perf_counter()
    out = fn(ids)
    return out, time.perf_counter() - t0


def interleaved_medians(fns, ids, rounds):
    """Median seconds per call of each fn, one call of each per round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(ids)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="compiler for both compiled models (default inductor)")
    p.add_argument("--tiny", action="store_true", help="a smaller model (d=32, S=5): for checking the script")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--plot", metavar="PATH", help="save the diagonal graph's S x L grid picture")
    args = p.parse_args(argv)

    print(f"machine: {machine()}")
    torch.manual_seed(0)
    hidden, segments = (32, 5) if args.tiny else (64, 6)
    model = build_armt("llama", hidden_size=hidden, num_layers=3, segment_size=16, num_mem_tokens=4, d_mem=16)
    model.eval()
    randomize_memory_(model)  # ARMT's W_v starts at zero: make the memory matter
    ids = torch.randint(0, 128, (1, 16 * segments))

    print(diagpass.explain(model, ids))

    # Layer weights stored stacked: the batched graph reads them as views. Left as
    # separate parameters they are copied into stacks on every call, which on a CPU
    # costs more than batching saves for a model this small: the backend then
    # compiles the model sequentially and its report says why (the cost decision).
    # Stored stacked, on CPU the first inference calls time the batched graph against
    # the sequential one and the faster runs from then on (report.measured_stacked).
    diagpass.stack_weights_(model.layers)
    sequential = torch.compile(model, backend="diagonal", options={"inner": args.inner, "enabled": False})
    diagonal = torch.compile(model, backend="diagonal", options={"inner": args.inner})
    with torch.no_grad():
        expected = model(ids)
        seq_out, seq_first = first_call(sequential, ids)
        assert diagpass.reports()[-1].reason == "disabled by options"
        out, diag_first = first_call(diagonal, ids)
        report = diagpass.reports()[-1]
        compiled_graphs = len(diagpass.reports())
        print(f"\nfirst call (Dynamo + passes + {args.inner}): sequential {seq_first:.1f} s, diagonal {diag_first:.1f} s")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seq_out, expected, rtol=1e-5, atol=1e-5)
        print(f"outputs equal eager: max |diff| diagonal {(out - expected).abs().max():.2e}, "
              f"sequential {(seq_out - expected).abs().max():.2e}")
        print(f"batched: {report.batched}" + ("" if report.batched else f" ({report.reason})"))
        if args.plot:
            report.plot(args.plot)
            print(f"grid picture: {args.plot}")

        fns = {"eager": model, f"sequential {args.inner}": sequential, f"diagonal {args.inner}": diagonal}
        interleaved_medians(fns, ids, 8)  # warm-up: a measured choice is made by then (8 calls)
        ms = {k: v * 1e3 for k, v in interleaved_medians(fns, ids, args.rounds).items()}
    # a recompile during timing would mean timing something other than the graphs above
    assert len(diagpass.reports()) == compiled_graphs, "a model recompiled while being timed"

    seq, diag = ms[f"sequential {args.inner}"], ms[f"diagonal {args.inner}"]
    print(f"\nsteady state, median of {args.rounds} interleaved rounds (no_grad, batch 1):")
    print(f"  diagonal vs sequential {args.inner}: {seq / diag:.2f}x (> 1: diagonal faster)   "
          f"vs eager: {ms['eager'] / diag:.2f}x")
    for name, value in ms.items():
        print(f"  {name:<22} {value:8.2f} ms")


if __name__ == "__main__":
    main()
