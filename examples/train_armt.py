"""Train a tiny ARMT (LLaMA layers) on synthetic associative recall, eager vs diagonal.

Task: each sequence starts with ``--pairs`` (key, value) token pairs, then filler tokens,
and ends with one of the keys (the query); the model must predict that key's value at the
last position. The pairs sit in segment 0, the query in the last segment, so the answer
can only reach the last segment through the per-layer associative memory.

Two copies of the same model (identical initial weights) are trained side by side on
identical batches: one eager, one ``torch.compile(backend="diagonal")``. Both loss curves,
their max abs difference, recall accuracy and wall times are printed.

    python examples/train_armt.py                    # inner="inductor" (default)
    python examples/train_armt.py --inner aot_eager  # faster to compile
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import diagpass
from diagpass.models.armt import build_armt

VOCAB = 128
KEYS = range(2, 2 + 16)  # key tokens
VALUES = range(32, 32 + 16)  # value tokens
FILLER = range(64, 128)  # filler tokens


def make_batch(g: torch.Generator, batch: int, seq_len: int, pairs: int):
    keys = torch.stack([torch.randperm(len(KEYS), generator=g)[:pairs] for _ in range(batch)]) + KEYS.start
    vals = torch.randint(VALUES.start, VALUES.stop, (batch, pairs), generator=g)
    ids = torch.randint(FILLER.start, FILLER.stop, (batch, seq_len), generator=g)
    ids[:, 0 : 2 * pairs : 2] = keys
    ids[:, 1 : 2 * pairs : 2] = vals
    which = torch.randint(0, pairs, (batch,), generator=g)
    ids[:, -1] = keys.gather(1, which[:, None])[:, 0]
    target = vals.gather(1, which[:, None])[:, 0]
    return ids, target


def step(model_fn, opt, ids, target):
    opt.zero_grad(set_to_none=True)
    logits = model_fn(ids)[:, -1]
    loss = F.cross_entropy(logits, target)
    loss.backward()
    opt.step()
    acc = (logits.argmax(-1) == target).float().mean()
    return loss.item(), acc.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--segments", type=int, default=4, help=">= 4 so that middle cells batch")
    ap.add_argument("--segment-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=1, help="1 is learned in 400 steps; 2-3 need far more")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1: on a busy 2-core box, 2 threads were ~50x slower (oversubscription)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def build():
        m = build_armt(
            "llama", vocab_size=VOCAB, hidden_size=64, num_layers=args.layers, num_heads=4,
            segment_size=args.segment_size, num_mem_tokens=2, d_mem=16, seed=args.seed,
        )
        return m.train()

    eager_model, diag_model = build(), build()
    for a, b in zip(eager_model.state_dict().values(), diag_model.state_dict().values()):
        assert torch.equal(a, b)
    # cost_model off: this example is about the batched graph; for a model this small
    # on CPU (weights copied: training, or not stored stacked) the backend would run it sequentially
    compiled = torch.compile(diag_model, backend="diagonal", options={"inner": args.inner, "cost_model": False})
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0) for m in (eager_model, diag_model)]

    seq_len = args.segments * args.segment_size
    g = torch.Generator().manual_seed(args.seed)
    print(
        f"ARMT-LLaMA L={args.layers} d=64, {args.segments} segments x {args.segment_size} tokens, "
        f"batch {args.batch}, {args.pairs} pairs, {args.steps} steps, inner={args.inner!r}"
    )
    print(f"{'step':>5} {'eager loss':>11} {'diag loss':>11} {'|diff|':>9} {'eager acc':>9} {'diag acc':>9}")
    curves = {"eager": [], "diag": []}
    accs = {"eager": [], "diag": []}
    times = {"eager": 0.0, "diag": 0.0}
    first_diag = None
    for i in range(args.steps):
        ids, target = make_batch(g, args.batch, seq_len, args.pairs)
        for name, fn, opt in (("eager", eager_model, opts[0]), ("diag", compiled, opts[1])):
            t = time.perf_counter()
            loss, acc = step(fn, opt, ids, target)
            dt = time.perf_counter() - t
            times[name] += dt
            if name == "diag" and i == 0:
                first_diag = dt
            curves[name].append(loss)
            accs[name].append(acc)
        if i % args.log_every == 0 or i == args.steps - 1:
            e, d = curves["eager"][-1], curves["diag"][-1]
            print(f"{i:>5} {e:>11.4f} {d:>11.4f} {abs(e - d):>9.2e} {accs['eager'][-1]:>9.3f} {accs['diag'][-1]:>9.3f}")

    diffs = [abs(a - b) for a, b in zip(curves["eager"], curves["diag"])]
    k = max(1, args.steps // 10)
    mean = lambda xs: sum(xs) / len(xs)
    print()
    early = min(50, args.steps)
    print(
        f"max |loss_eager - loss_diag|: first step {diffs[0]:.3e}, first {early} steps {max(diffs[:early]):.3e}, "
        f"all {args.steps} steps {max(diffs):.3e} (rounding differences grow through the optimizer: "
        f"the runs are the same math, not the same bits)"
    )
    for name in ("eager", "diag"):
        print(
            f"{name:>5}: loss step 0 {curves[name][0]:.3f}, first {k} steps {mean(curves[name][:k]):.3f} -> "
            f"last {k} steps {mean(curves[name][-k:]):.3f} (ln {len(VALUES)} = {math.log(len(VALUES)):.3f}: "
            f"loss of predicting the value distribution without recall); "
            f"acc last {k} steps {mean(accs[name][-k:]):.3f} (chance {1 / len(VALUES):.3f}, "
            f"guessing among the {args.pairs} values seen {1 / args.pairs:.3f})"
        )
    print(
        f"wall time: eager {times['eager']:.1f} s; diagonal {times['diag']:.1f} s "
        f"(of which first step incl. compile {first_diag:.1f} s; steady {times['diag'] - first_diag:.1f} s)"
    )
    print(
        f"diagonal: graphs batched {diagpass.counters['backend']['graphs_batched']}, "
        f"cells batched {diagpass.counters['batch']['cells']}"
    )
    for name in ("eager", "diag"):
        # below the no-recall baseline ln 16 by a margin: the value was carried
        # from segment 0 to the last segment through the memory
        assert mean(curves[name][-k:]) < math.log(len(VALUES)) - 0.5, f"{name}: recall not learned"


if __name__ == "__main__":
    main()
