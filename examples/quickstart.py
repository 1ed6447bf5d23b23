"""Quickstart: an ARMT over a tiny LLaMA, compiled with backend="diagonal".

    python examples/quickstart.py

Prints the explain report (the S x L grid and its wavefronts), checks the
compiled model equals the eager one, and times both. No `import diagpass`
is needed for torch.compile to find the backend; we import it only for
explain() and the reference model.
"""

import time

import torch

import diagpass
from diagpass.models import build_armt, randomize_memory_

torch.manual_seed(0)
model = build_armt("llama", hidden_size=64, num_layers=3, segment_size=16, num_mem_tokens=4, d_mem=16)
randomize_memory_(model)  # ARMT's W_v starts at zero: make the memory matter
ids = torch.randint(0, 128, (1, 16 * 6))  # 6 segments of 16 tokens

print(diagpass.explain(model, ids))

# Layer weights stored stacked: the batched graph reads them as views. Left as
# separate parameters they are copied into stacks on every call, which on a CPU
# costs more than batching saves for a model this small: the backend then
# compiles the model sequentially and its report says why (the cost decision).
diagpass.stack_weights_(model.layers)
fast = torch.compile(model, backend="diagonal")  # inner compiler: Inductor
with torch.no_grad():
    t0 = time.perf_counter()
    out = fast(ids)
    print(f"\nfirst call (Dynamo + passes + Inductor): {time.perf_counter() - t0:.1f} s")
    expected = model(ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    print(f"outputs equal eager: max |diff| = {(out - expected).abs().max():.2e}")
    print(f"batched: {diagpass.backend.reports[-1].batched}")


def median_time(fn, repeats=10):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


with torch.no_grad():
    seq, diag = median_time(model), median_time(fast)
print(f"sequential eager: {seq * 1e3:.1f} ms   diagonal (Inductor): {diag * 1e3:.1f} ms   "
      f"ratio {seq / diag:.2f}x")
