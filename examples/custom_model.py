"""A recurrent-memory transformer written from plain torch.nn, compiled with
backend="diagonal". Nothing from diagpass is needed to define or compile it.

Each layer keeps a gated memory vector per layer: the read adds a projection
of the memory to every position, the write blends in a summary of the
layer's output. Memory is per layer, so cell (s, l) depends on (s, l-1) and
(s-1, l) only: the compiler finds S + L - 1 wavefronts.

    python examples/custom_model.py
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.read, self.write, self.gate = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, memory):
        if memory is not None:  # segment 0 has nothing to read
            x = x + self.read(memory).unsqueeze(1)
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        summary = torch.tanh(self.write(x.mean(1)))
        g = torch.sigmoid(self.gate(x.mean(1)))
        memory = summary if memory is None else g * memory + (1 - g) * summary
        return x, memory


class RecurrentLM(nn.Module):
    def __init__(self, vocab=256, d=64, layers=4, heads=4, segment=16):
        super().__init__()
        self.segment = segment
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MemoryBlock(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        memories = [None] * len(self.blocks)
        logits = []
        for segment in ids.split(self.segment, dim=1):
            h = self.embed(segment)
            for i, block in enumerate(self.blocks):
                h, memories[i] = block(h, memories[i])
            logits.append(self.head(h))
        return torch.cat(logits, dim=1)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = RecurrentLM(layers=3).eval()
    ids = torch.randint(0, 256, (2, 16 * 5 + 5))  # 5 full segments and a short one
    # cost_model off: this model is too small for batching with copied weights to
    # pay on a CPU, and the backend would (rightly) compile it sequentially
    compiled = torch.compile(model, backend="diagonal", options={"inner": "inductor", "cost_model": False})
    with torch.no_grad():
        t0 = time.perf_counter()
        out = compiled(ids)
        print(f"first call: {time.perf_counter() - t0:.1f} s")
        torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-5)
        print("outputs equal eager")

    import diagpass  # only for the report of what the backend did

    report = diagpass.reports()[-1]
    print(report)
