"""A refactor's cost: diagpass at a git revision against the working tree, in one process.

    python -m benchmarks.before_after REV [--segments 8] [--threads 2] [--rounds 15]

The package at ``REV`` is extracted (``git archive``) into a temporary directory
as ``diagpass_old`` and its backend called directly; the working tree's is the
``after``. Both compile the small ARMT-LLaMA (d=256, L=8, 64 + 16 tokens per
segment, fp32) with Inductor, weights copied and weights stored stacked
(``cost_model`` off, so both batch), and are timed in interleaved rounds in this
one process. Outputs must be bit-identical. First calls are not comparable: the
second compile of an equal graph hits Inductor's warm cache.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _extract(rev: str, into: pathlib.Path) -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "diagpass"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "diagpass").rename(into / "diagpass_old")
    for path in (into / "diagpass_old").rglob("*.py"):
        text = re.sub(r"\b(from|import) diagpass([. ])", r"\1 diagpass_old\2", path.read_text())
        text = text.replace('"diagpass.', '"diagpass_old.')
        if path.name == "__init__.py" and path.parent.name == "diagpass_old":
            text = re.sub(r"^_register\(\)$", "", text, flags=re.M)  # "diagonal" stays the tree's
        path.write_text(text)


def _model(stacked: bool):
    import diagpass
    from diagpass.models.armt import build_armt, randomize_memory_

    m = build_armt("llama", vocab_size=1000, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=4,
                   intermediate_size=512, segment_size=64, num_mem_tokens=16, d_mem=32, seed=0).eval()
    randomize_memory_(m)
    if stacked:
        diagpass.stack_weights_(m.layers)
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="diagpass_before_"))
    _extract(args.rev, tmp)
    sys.path.insert(0, str(tmp))
    import diagpass
    import diagpass_old

    ids = torch.randint(0, 1000, (1, 64 * args.segments), generator=torch.Generator().manual_seed(0))
    backends = {"before": diagpass_old.backend.diagonal_backend, "after": diagpass.backend.diagonal_backend}
    modes = {}
    for stacked in (False, True):
        for name, backend in backends.items():
            torch._dynamo.reset()
            fn = torch.compile(_model(stacked), backend=functools.partial(
                backend, options={"inner": "inductor", "cost_model": False}))
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(ids)
            modes[(name, stacked)] = (fn, time.perf_counter() - t0, out)
    for stacked in (False, True):
        torch.testing.assert_close(modes[("before", stacked)][2], modes[("after", stacked)][2], rtol=0, atol=0)
    times = {k: [] for k in modes}
    with torch.no_grad():
        for _ in range(args.rounds):
            for k, (fn, _, _) in modes.items():
                t0 = time.perf_counter()
                fn(ids)
                times[k].append(time.perf_counter() - t0)
    print(f"{args.rev} vs working tree: S={args.segments}, {args.threads} threads, {args.rounds} interleaved rounds")
    print("| weights | before ms | after ms | after / before |")
    print("|---|---:|---:|---:|")
    for stacked in (False, True):
        b, a = (statistics.median(times[(n, stacked)]) * 1e3 for n in ("before", "after"))
        print(f"| {'stored stacked' if stacked else 'copied per call'} | {b:.1f} | {a:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
