"""torch.utils.checkpoint around cells: inlined with the checkpoint's own
recompute tags, batched in training, gradients exact, and still recomputed
(fewer bytes saved for backward than the same model without checkpoint)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import diagpass
from diagpass.testing import assert_equivalent

D, SEG, S, L = 16, 4, 5, 3


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.up, self.down = nn.Linear(D, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.m = nn.Linear(D, D)

    def forward(self, x, mem):
        x = x + torch.tanh(self.w(x) + mem)
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return x, mem + self.m(x).mean(1, keepdim=True)


class Net(nn.Module):
    def __init__(self, use_checkpoint: bool):
        super().__init__()
        self.layers = nn.ModuleList(Cell() for _ in range(L))
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        mems = [x.new_zeros(x.shape[0], 1, D) + 0.1 * l for l in range(L)]
        outs = []
        for seg in x.split(SEG, 1):
            for l, layer in enumerate(self.layers):
                if self.use_checkpoint:
                    seg, mems[l] = checkpoint(layer, seg, mems[l], use_reentrant=False)
                else:
                    seg, mems[l] = layer(seg, mems[l])
            outs.append(seg)
        return torch.cat(outs, 1)


def _x():
    return torch.randn(2, S * SEG, D, generator=torch.Generator().manual_seed(0), requires_grad=True)


def test_checkpointed_cells_batch_in_training_with_exact_gradients():
    torch.manual_seed(0)
    before = diagpass.counters["batch"]["checkpointed_groups"]
    report = assert_equivalent(
        Net(use_checkpoint=True), _x(), options={"inner": "aot_eager", "cost_model": False},
        grads=True, expect_batched=True,
    )
    graph = report.graphs[0]
    assert graph.num_wavefronts == S + L - 1
    assert max(len(g) for g in graph.batched_groups) == L
    assert diagpass.counters["batch"]["checkpointed_groups"] - before == len(graph.batched_groups)


def _saved_bytes(model, x) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "cost_model": False})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    assert diagpass.reports()[-1].batched, diagpass.reports()[-1].reason
    out.sum().backward()
    return total[0]


def test_checkpoint_still_recomputes_after_batching():
    torch.manual_seed(0)
    plain = Net(use_checkpoint=False)
    checkpointed = Net(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    saved_plain, saved_ckpt = _saved_bytes(plain, _x()), _saved_bytes(checkpointed, _x())
    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)


def test_selective_checkpoint_is_refused_with_the_reason():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    class Selective(Net):
        def forward(self, x):
            mems = [x.new_zeros(x.shape[0], 1, D) for _ in range(L)]
            for seg in x.split(SEG, 1):
                for l, layer in enumerate(self.layers):
                    seg, mems[l] = checkpoint(
                        layer, seg, mems[l], use_reentrant=False,
                        context_fn=functools.partial(create_selective_checkpoint_contexts, policy),
                    )
            return seg

    torch.manual_seed(0)
    report = assert_equivalent(Selective(True), _x(), options={"inner": "aot_eager"}, grads=True, expect_batched=False)
    assert "selective activation checkpointing" in report.graphs[0].reason


@pytest.mark.slow
def test_checkpointed_cells_under_inductor_train_exactly():
    torch.manual_seed(0)
    assert_equivalent(
        Net(use_checkpoint=True), _x(), options={"inner": "inductor", "cost_model": False},
        grads=True, expect_batched=True,
    )


def test_checkpointed_graphs_compile_whole_not_as_wavefront_steps(caplog):
    """Cut into steps, the checkpointed model saved more for its backward than the whole graph."""
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="diagpass"):
        _saved_bytes(Net(use_checkpoint=True), _x())
    assert diagpass.reports()[-1].wavefront_steps is None
    assert "the batched graph compiles whole, not wavefront by wavefront: torch.utils.checkpoint regions" in caplog.text


def _second_count_saved_bytes(model, segments=(S, S + 3)) -> int:
    """Bytes saved for backward on a second segment count (Dynamo's graph dynamic, specialised)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="diagonal", options={"inner": "aot_eager", "cost_model": False})
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    for n in segments:
        x = torch.randn(2, n * SEG, D, generator=torch.Generator().manual_seed(n), requires_grad=True)
        total[0] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compiled(x)
        out.sum().backward()
    assert any(r.batched and r.num_segments == segments[-1] for r in diagpass.reports())
    return total[0]


@pytest.mark.slow
def test_a_second_segment_count_of_checkpointed_cells_still_recomputes_with_exact_gradients():
    """The static graph of the second count inlines the checkpoint bodies with their tags too."""
    from diagpass.testing import gradients

    torch.manual_seed(0)
    plain, checkpointed = Net(use_checkpoint=False), Net(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    saved_plain, saved_ckpt = _second_count_saved_bytes(plain), _second_count_saved_bytes(checkpointed)
    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)
    assert diagpass.counters["specialize"]["graphs_compiled"] == 2  # one per model
    x = torch.randn(2, (S + 3) * SEG, D, generator=torch.Generator().manual_seed(S + 3))
    compiled = torch.compile(checkpointed, backend="diagonal", options={"inner": "aot_eager", "cost_model": False})
    compiled(torch.randn(2, S * SEG, D))
    got, want = gradients(compiled, checkpointed, x), gradients(checkpointed, checkpointed, x)
    for name in want:  # a weight's gradient sums over its cells, batched in another order
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=5e-5)
