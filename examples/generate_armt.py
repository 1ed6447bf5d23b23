"""Generate with a tiny ARMT: prefill through the diagonal backend, then decode with the
per-layer key/value cache of the current segment.

Prints the prompt, a greedy continuation with the kv cache (checked against the
re-run decoder and the no-cache sequential reference), two sampled continuations
(seeded: reproducible), the prefill time of eager vs ``torch.compile(backend="diagonal")``
and the decoding speed in tokens/s of ``cache="kv"`` vs ``cache="rerun"`` side by side.
The weights are random (untrained), so the tokens are meaningless; the point is the
mechanics and the exactness.

    python examples/generate_armt.py [--inner inductor|aot_eager|eager] [--segments 16] [--new 64]
"""

from __future__ import annotations

import argparse
import time

import torch

import diagpass
from diagpass.models.armt import build_armt, randomize_memory_
from diagpass.models.generation import generate, make_decoder, prefill


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_seconds(model, states, first: torch.Tensor, n: int, cache: str) -> float:
    """Wall time of ``n`` greedy decoding steps (no prefill) after the memory ``states``,
    starting from the token ids ``first`` (B, 1); best of 3."""

    def run():
        dec = make_decoder(model, list(states), cache)
        tok = first
        for _ in range(n):
            tok = dec.feed(tok)[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        return timed(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--segments", type=int, default=16, help="whole segments in the prompt")
    ap.add_argument("--segment-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="max_new_tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build_armt(
        args.arch, hidden_size=64, num_layers=args.layers, segment_size=args.segment_size, num_mem_tokens=2, d_mem=16
    )
    randomize_memory_(model)  # untrained: give the memory something to do
    T = args.segment_size
    prompt = torch.randint(0, 128, (1, args.segments * T + 3), generator=torch.Generator().manual_seed(0))
    # cost_model off: this example is about the batched graph; for a model this small
    # on CPU (weights copied: training, or not stored stacked) the backend would run it sequentially
    compiled = torch.compile(model, backend="diagonal", options={"inner": args.inner, "cost_model": False})

    print(f"ARMT-{args.arch} L={args.layers}, segment {T} tokens, prompt {prompt.shape[1]} tokens "
          f"({args.segments} whole segments + 3), {args.new} new tokens")
    print("prompt (last 16):", prompt[0, -16:].tolist())

    t = time.perf_counter()
    greedy = generate(model, prompt, args.new, compiled=compiled)  # kv cache; first call compiles the prefill
    first = time.perf_counter() - t
    rerun = generate(model, prompt, args.new, compiled=compiled, cache="rerun")
    with torch.no_grad():
        ref = prompt
        for _ in range(args.new):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    P = prompt.shape[1]
    print("greedy (kv cache):", greedy[0, P:].tolist())
    print("greedy (re-run)  :", rerun[0, P:].tolist(), "(equal)" if torch.equal(rerun, greedy) else "(DIFFERENT)")
    print("sequential ref   :", ref[0, P:].tolist(), "(equal)" if torch.equal(ref, greedy) else "(DIFFERENT)")
    for seed in (0, 1):
        s = generate(model, prompt, args.new, do_sample=True, temperature=0.8, top_k=20, seed=seed, compiled=compiled)
        again = generate(model, prompt, args.new, do_sample=True, temperature=0.8, top_k=20, seed=seed)
        print(f"sampled seed={seed}   :", s[0, P:].tolist(), "(reproducible)" if torch.equal(s, again) else "(NOT reproducible)")

    with torch.no_grad():
        t_eager = timed(lambda: prefill(model, prompt))
        t_diag = timed(lambda: prefill(model, prompt, compiled))
        t_dec = timed(lambda: generate(model, prompt[:, : args.segments * T], args.new, compiled=compiled), repeat=1)
        _, states = model(prompt[:, : args.segments * T], return_state=True)
    first_tok = prompt[:, -1:]
    t_kv = decode_seconds(model, states, first_tok, args.new, "kv")
    t_rr = decode_seconds(model, states, first_tok, args.new, "rerun")
    print()
    print(f"first greedy call incl. compiling the prefill ({args.inner}): {first:.2f} s")
    print(f"prefill of {args.segments * T} tokens: eager {t_eager * 1e3:.1f} ms, diagonal ({args.inner}) "
          f"{t_diag * 1e3:.1f} ms, speed-up {t_eager / t_diag:.2f}x (best of 3)")
    print(f"generate({args.new} tokens, kv cache) incl. diagonal prefill: {t_dec * 1e3:.1f} ms")
    print(f"decoding {args.new} tokens ({torch.get_num_threads()} thread(s), best of 3): "
          f"kv cache {args.new / t_kv:.0f} tok/s | re-run {args.new / t_rr:.0f} tok/s | {t_rr / t_kv:.2f}x")
    print(f"diagonal: graphs batched {diagpass.counters['backend']['graphs_batched']}, "
          f"cells batched {diagpass.counters['batch']['cells']}")


if __name__ == "__main__":
    main()
