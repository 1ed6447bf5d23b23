"""python -m benchmarks.summary FILE.json ... — one row per point of each run: the default options
(mode ``diagonal``) against Inductor sequential, side by side as each run measured them.

The issue-16 claim ("never slower by default") is a claim over many runs (one config, thread
count and day each); this reads their JSON (``benchmarks/results/*.json``) and prints the
defaults' row of every point, with what the defaults ran, the even-load bound's share and the
peak memory, then how many points meet >= 1.0x (median) and <= 1.1x peak tensors. Nothing is
re-measured: a row is only as fresh as its file (its date is printed).

    python -m benchmarks.summary benchmarks/results/issue16_s20_*.json [--mode diagonal]
"""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

from .report import bound_share, paired_speedup

HEADER = ("| point | threads | date | Inductor seq ms | defaults vs seq (paired) | defaults ran | bound vs seq "
          "| bound share | peak tensors vs seq | first call s: seq / defaults | file |")


def ran(mode: dict) -> str:
    """What the compiled graph ran, from the backend report the benchmark kept."""
    d = mode.get("diag") or {}
    if d.get("batched"):
        return "batched"
    reason = d.get("reason") or ""
    if ":" in reason.split(" ")[0]:  # "memory: ...", "cost: ...": the rule that refused the copy
        return f"sequential ({reason.split(':')[0]} rule)"
    return f"sequential ({reason[:40]}{'...' if len(reason) > 40 else ''})" if reason else "sequential"


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def rows(path: str, mode: str) -> List[dict]:
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    out = []
    for r in data["results"]:
        modes = r["modes"]
        seq, diag, bound = modes.get("inductor", {}), modes.get(mode, {}), modes.get("bound", {})
        if "median_ms" not in seq or "median_ms" not in diag:
            continue
        out.append({
            "label": r["label"], "threads": meta.get("threads"), "date": (meta.get("date") or "")[:10],
            "seq_ms": seq["median_ms"], "speedup": seq["median_ms"] / diag["median_ms"],
            "paired": paired_speedup(seq, diag), "ran": ran(diag),
            "bound": _ratio(seq["median_ms"], bound.get("median_ms")),
            "share": bound_share(seq["median_ms"], diag["median_ms"], bound.get("median_ms")),
            "peak": _ratio(diag.get("tensor_peak_mb"), seq.get("tensor_peak_mb")),
            "first": (seq.get("first_call_s"), diag.get("first_call_s")), "file": path.split("/")[-1],
        })
    return out


def _x(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def markdown(all_rows: List[dict]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in all_rows:
        # a bound within noise of sequential leaves no gain to share (batch 4 on one thread)
        share = "-" if r["share"] is None or r["bound"] < 1.05 else f"{100 * r['share']:.0f}%"
        first = " / ".join("-" if v is None else f"{v:.1f}" for v in r["first"])
        lines.append(f"| {r['label']} | {r['threads']} | {r['date']} | {r['seq_ms']:.1f} | **{_x(r['speedup'], 3)}** "
                     f"({_x(r['paired'], 3)}) | {r['ran']} | {_x(r['bound'])} | {share} | {_x(r['peak'])} | {first} "
                     f"| {r['file']} |")
    fast = sum(r["speedup"] >= 1.0 for r in all_rows)
    peaks = [r for r in all_rows if r["peak"] is not None]
    lean = sum(r["peak"] <= 1.1 for r in peaks)
    lines += ["", f"{len(all_rows)} rows: defaults >= 1.0x sequential Inductor (median) on {fast}; "
                  f"peak tensors <= 1.1x on {lean} of the {len(peaks)} with memory measured"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--mode", default="diagonal", help="the mode to compare (default: diagonal, the defaults)")
    args = ap.parse_args(argv)
    print(markdown([row for path in args.files for row in rows(path, args.mode)]))


if __name__ == "__main__":
    main()
