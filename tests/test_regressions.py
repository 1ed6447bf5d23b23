"""Minimal models from failures found by the property tests, kept forever."""

import torch

from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.testing import assert_equivalent


def test_aot_eager_backward_of_vmapped_views():
    """Found by test_random_models_aot_eager_with_grads: with plain aot_eager the
    traced backward replayed a `view` that the real strides of the batched ops
    did not allow (RuntimeError in loss.backward()). Inner "aot_eager" now uses
    the decomposing variant; eager and Inductor were never affected."""
    cfg = FamilyConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, bias=True, rope=True,
        memory_kind="linear_attention", segment_size=2, num_mem_tokens=0,
    )
    model = build_family_model(cfg, seed=0)
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    report = assert_equivalent(model, ids, options={"inner": "aot_eager"}, grads=True, expect_batched=True)
    assert report.graphs[0].num_wavefronts == 5 + 2 - 1
