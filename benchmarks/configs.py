"""Named benchmark configurations. A config expands to a list of points; each point is one
(model shape, segment size, memory tokens, number of segments S, dtype) measurement."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    vocab_size: int = 128
    d_mem: int = 16
    gpu_only: bool = False
    # "armt" (ARMT-LLaMA, diagpass.models.armt) or a memory kind of the research-family
    # model (diagpass.models.family: "gated", "linear_attention", "xl_cache", ...)
    model: str = "armt"


SHAPES: Dict[str, Shape] = {
    "tiny": Shape("tiny", 64, 4, 4),
    # non-ARMT memory: a gated slot memory per layer (family model, swiglu, rmsnorm, rope)
    "small-gated": Shape("small-gated", 256, 8, 4, intermediate_size=512, model="gated"),
    "small": Shape("small", 256, 8, 4),
    # more non-ARMT kinds of the family model, the same sizes as small-gated
    "small-assoc": Shape("small-assoc", 256, 8, 4, intermediate_size=512, model="associative"),
    "small-linear": Shape("small-linear", 256, 8, 4, intermediate_size=512, model="linear_attention"),
    "medium": Shape("medium", 512, 12, 8),
    # LLaMA-3.2-1B-like: d=2048, L=16, GQA 32/8, ffn 8192
    "llama1b": Shape("llama1b", 2048, 16, 32, 8, 8192, vocab_size=32000, d_mem=64, gpu_only=True),
}


@dataclasses.dataclass(frozen=True)
class Point:
    shape: Shape
    segment_size: int
    num_mem_tokens: int
    segments: int
    dtype: str = "fp32"
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.segment_size * self.segments

    @property
    def label(self) -> str:
        return (f"{self.shape.name} T={self.segment_size}+{self.num_mem_tokens} S={self.segments} "
                f"N={self.tokens} {self.dtype} B={self.batch}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @staticmethod
    def from_dict(d: dict) -> "Point":
        d = dict(d)
        d["shape"] = Shape(**d["shape"])
        return Point(**d)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    description: str
    shape: str
    segment_sizes: Tuple[int, ...]
    num_mem_tokens: int
    segments: Tuple[int, ...]
    dtypes: Tuple[str, ...] = ("fp32",)
    batch: int = 1

    def points(self, segments: Optional[List[int]] = None, dtypes: Optional[List[str]] = None) -> List[Point]:
        shape = SHAPES[self.shape]
        out = []
        for dt in dtypes or self.dtypes:
            for T in self.segment_sizes:
                for S in segments or self.segments:
                    out.append(Point(shape, T, self.num_mem_tokens, S, dt, self.batch))
        return out


CONFIGS: Dict[str, Config] = {c.name: c for c in [
    Config("quick", "tiny ARMT-LLaMA d=64 L=4 S=4 (the --quick run; S=2 has no batchable wavefront)",
           "tiny", (16,), 4, (4,)),
    Config("tiny", "tiny ARMT-LLaMA d=64 L=4, sequence length x dtype",
           "tiny", (16,), 4, (2, 4, 8), ("fp32", "bf16")),
    Config("tiny-seg", "tiny ARMT-LLaMA, segment-size sweep at S=4",
           "tiny", (8, 16, 32), 4, (4,)),
    Config("small", "small ARMT-LLaMA d=256 L=8, 64 tokens + 16 memory, sequence-length sweep",
           "small", (64,), 16, (2, 4, 8), ("fp32", "bf16")),
    Config("small-headline", "issue 4 headline: small ARMT-LLaMA d=256 L=8, 64+16, S=32, B=1, fp32",
           "small", (64,), 16, (32,)),
    Config("sweep", "issue 16 sweep (CPU part): small ARMT-LLaMA d=256 L=8, 64+16, S in {4, 8}",
           "small", (64,), 16, (4, 8)),
    Config("sweep-b4", "issue 16 sweep: small ARMT-LLaMA, batch 4", "small", (64,), 16, (8,), batch=4),
    Config("sweep-gated", "issue 16 sweep: non-ARMT gated slot memory d=256 L=8, 64+16, S=8",
           "small-gated", (64,), 16, (8,)),
    Config("sweep-assoc", "issue 16 sweep: associative family memory d=256 L=8, 64+16, S=16",
           "small-assoc", (64,), 16, (16,)),
    Config("sweep-linear", "issue 16 sweep: linear-attention family memory d=256 L=8, 64+16, S=16",
           "small-linear", (64,), 16, (16,)),
    Config("medium", "medium ARMT-LLaMA d=512 L=12, 64+16", "medium", (64,), 16, (2, 4)),
    Config("llama1b", "LLaMA-1B shape d=2048 L=16 GQA 32/8 ffn 8192, 1024+128 (GPU only)",
           "llama1b", (1024,), 128, (4, 8, 16)),
]}

QUICK = ["quick"]
FULL = ["tiny", "tiny-seg", "small", "medium", "small-headline", "llama1b"]
