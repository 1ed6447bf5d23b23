"""Bad inputs: the compiled model fails like eager, and not from inside the pass.

For each bad input the eager model's exception type is taken as the
reference; the compiled model (``backend="diagonal"``, inner "eager") must
raise an exception of that type, and no frame of its traceback (nor of its
chained causes) may lie in ``diagpass/passes``.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.nn as nn

import diagpass
from diagpass.models.family import FamilyConfig, build_family_model

PASSES_DIR = os.path.join("diagpass", "passes")

CONFIG = FamilyConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, segment_size=3,
                      memory_kind="associative", num_mem_tokens=1)


def _family():
    return build_family_model(CONFIG, seed=0)


class TwoInputNet(nn.Module):
    """Per-layer memory with a caller-supplied initial memory (batch must match)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, mem0):
        mems = [mem0 for _ in self.layers]
        outs = []
        for seg in x.split(4, dim=1):
            for l, layer in enumerate(self.layers):
                seg = seg + torch.tanh(layer(seg) + mems[l])
                mems[l] = mems[l] + seg.mean(1, keepdim=True)
            outs.append(seg)
        return torch.cat(outs, 1)


def _frames(exc):
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        exc = exc.__cause__ or exc.__context__
    return out


def _eager_error(model, args):
    with torch.no_grad():
        try:
            model(*args)
        except Exception as e:  # noqa: BLE001
            return e
    return None


BAD = {
    "float_ids": lambda: (_family(), (torch.rand(2, 12) * 31,)),
    "rank_1_ids": lambda: (_family(), (torch.randint(0, 32, (12,)),)),
    "rank_3_ids": lambda: (_family(), (torch.randint(0, 32, (2, 12, 1)),)),
    "ids_out_of_vocab": lambda: (_family(), (torch.full((2, 12), 40, dtype=torch.long),)),
    "negative_ids": lambda: (_family(), (torch.full((2, 12), -1, dtype=torch.long),)),
    "empty_ids": lambda: (_family(), (torch.zeros(2, 0, dtype=torch.long),)),
    "mismatched_batch": lambda: (TwoInputNet().eval(), (torch.randn(2, 16, 8), torch.randn(3, 1, 8))),
    "mismatched_width": lambda: (TwoInputNet().eval(), (torch.randn(2, 16, 8), torch.randn(2, 1, 5))),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_raises_like_eager(name):
    torch.manual_seed(0)
    model, args = BAD[name]()
    expected = _eager_error(model, args)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "eager"})
    if expected is None:  # eager accepts it (e.g. zero tokens): same output then
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(type(expected)) as info:
        with torch.no_grad():
            compiled(*args)
    frames = _frames(info.value)
    inside = [f for f in frames if PASSES_DIR in f.replace("\\", "/")]
    assert not inside, f"{name}: traceback goes through the pass: {inside}\n{info.value}"
    assert diagpass.counters["backend"]["graphs_fallback_error"] == 0
