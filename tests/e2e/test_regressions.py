"""Minimal models from failures found by the property tests, kept forever."""

import pytest
import torch

from diagpass.models.family import FamilyConfig, build_family_model
from diagpass.testing import assert_equivalent, float64_copy


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


def test_detach_feeding_back_into_its_producer_stays_in_the_cell():
    """Found by the property soak: with memory parameters outside the layers and
    truncated BPTT every segment, a state `detach` was made glue although the
    producer cell itself read it back, so the partition was not convex and
    nothing batched (safe, but a lost batch). Such a detach now joins the cell."""
    cfg = FamilyConfig(
        vocab_size=32, d_model=4, n_layers=2, n_heads=1, segment_size=1, num_mem_tokens=0,
        memory_kind="linear_attention", d_mem=2, nu=1, memory_params_outside=True, detach_every=1,
    )
    model = build_family_model(cfg, seed=0)
    ids = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(0))
    report = assert_equivalent(model, ids, options={"inner": "eager"}, expect_batched=True)
    assert "not self-contained" not in (report.graphs[0].reason or "")


@pytest.mark.slow
def test_fp64_oracle_copies_models_that_keep_state_in_attributes():
    """Found by the 5,040-model thorough run: with memory kept in module
    attributes (``state_in_attributes``), gradients 3e-5 off eager fp32 sent
    assert_equivalent to its float64 oracle, whose ``deepcopy`` of the model
    raised on the non-leaf state tensors (RuntimeError from the test helper,
    not a wrong result). ``float64_copy`` now copies such state detached."""
    cfg = FamilyConfig(
        vocab_size=32, d_model=32, n_layers=4, n_heads=4, d_ff=64, ffn_kind="swiglu", norm_placement="pre",
        norm_kind="layernorm", bias=True, rope=True, segment_size=1, num_mem_tokens=1,
        memory_kind="associative", d_mem=2, nu=2, state_in_attributes=True,
    )
    model = build_family_model(cfg, seed=497402)
    ids = torch.tensor([[29, 10, 26, 24]])
    assert_equivalent(model, ids, options={"inner": "eager"}, grads=True, expect_batched=True)
    import diagpass

    assert diagpass.counters["testing"]["grads_checked_against_fp64"] == 1  # the oracle really ran
    twin = float64_copy(model)  # the model now holds graph-attached state from the runs above
    assert next(twin.parameters()).dtype == torch.float64


def test_ill_conditioned_gradients_are_judged_against_reordering_noise():
    """Found by the thorough run (associative memory, memory parameters outside
    the layers, one-token segments): a DPFP query with q.z == 0 exactly makes
    the read divide by eps = 1e-5, so gradients pass through 3e9-sized terms
    that cancel. Eager fp32 lands 0.016 from fp64 only because both sides of the
    cancellation round identically; the *sequential* compiled model (no
    diagpass) is 73 (aot_eager) and 146 (Inductor) off, the batched one 146.
    Measured, not a wrong rewrite: assert_equivalent now takes the sequential
    compiled model's error as the reference when eager's is not enough."""
    import diagpass

    cfg = FamilyConfig(
        vocab_size=32, d_model=8, n_layers=2, n_heads=1, d_ff=16, ffn_kind="swiglu", norm_placement="post",
        norm_kind="layernorm", bias=True, rope=False, segment_size=1, num_mem_tokens=3,
        memory_kind="associative", d_mem=3, nu=2, memory_params_outside=True,
    )
    model = build_family_model(cfg, seed=2489)
    ids = torch.tensor([[25, 24, 10, 28]])
    report = assert_equivalent(model, ids, options={"inner": "eager"}, grads=True, expect_batched=True)
    assert report.graphs[0].batched_groups == [[(2, 0), (1, 1)]]
    # Whether the sequential-compiled reference is needed depends on the CPU's
    # rounding (needed on the Intel machine that found it, not on an AMD EPYC):
    # the mechanism itself is tested machine-independently below.
    assert diagpass.counters["testing"]["grads_checked_against_sequential_compiled"] <= 1


def test_grads_reference_falls_back_to_sequential_compiled():
    """The rule behind the test above, with the reorder noise injected: a
    gradient error larger than eager's own passes only if the sequential
    compiled model (no pass) is at least half as far off."""
    import diagpass
    from diagpass.testing import assert_grads_as_exact_as_eager, gradients

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    expected = gradients(model, model, x)
    actual = {n: g + 1e-3 for n, g in expected.items()}

    def sequential_noise(size):
        return lambda *a, **k: [(None, {n: g + size for n, g in expected.items()})]

    assert_grads_as_exact_as_eager(model, (x,), {}, actual, expected, atol=1e-5, sequential=sequential_noise(6e-4))
    assert diagpass.counters["testing"]["grads_checked_against_sequential_compiled"] == 1
    with pytest.raises(AssertionError, match="less exact than eager"):
        assert_grads_as_exact_as_eager(model, (x,), {}, actual, expected, atol=1e-5, sequential=sequential_noise(1e-4))


def test_fp32_gradient_noise_is_decided_in_float64():
    """Found by the 2026-11-25 thorough run (seed 37502; shrinking gave up):
    post-norm associative memory with parameters outside the layers, 4 layers,
    5-token segments. Eager fp32 gradients are 5.8e-4 off fp64 (gradients of
    ~50), the batched ones 1.3e-3 -- beyond 2x, so ``assert_equivalent`` fails.
    Not a wrong rewrite: in float64 the same model batched matches eager to
    1e-9 in outputs and every gradient, which is what the property test now
    falls back to."""
    cfg = FamilyConfig(
        vocab_size=32, d_model=8, n_layers=4, n_heads=1, d_ff=16, ffn_kind="swiglu", norm_placement="post",
        norm_kind="rmsnorm", bias=True, rope=False, segment_size=5, num_mem_tokens=0,
        memory_kind="associative", d_mem=4, nu=2, memory_shift=3, memory_params_outside=True,
    )
    model = build_family_model(cfg, seed=37502)
    ids = torch.tensor([[13, 8, 12, 23, 6, 11, 31, 26, 16, 9, 16, 13, 13, 24, 21, 25, 0, 9, 3, 29, 27, 8, 8]])
    report = assert_equivalent(float64_copy(model), ids, options={"inner": "eager"}, grads=True,
                               expect_batched=True, rtol=1e-9, atol=1e-9)
    assert report.graphs[0].batched_groups == [
        [(2, 0), (1, 1)], [(3, 0), (2, 1), (1, 2)], [(3, 1), (2, 2), (1, 3)], [(3, 2), (2, 3)]
    ]


def test_fp32_gap_beyond_eagers_own_error_is_within_the_rounding_sensitivity():
    """Found (and shrunk) by the 2026-11-25 thorough run: associative memory
    with d_mem=2, S=5, L=3, batch 2. Batched fp32 is 1.05e-3 off fp64 where
    eager (and the sequential compiled model) is 1.0e-4 -- 10x, beyond the old
    4x bound. In float64 the batched model equals eager to 1e-9; perturbing
    every weight by one fp32 ulp moves eager's output by ~5e-3: eager's small
    error is luck of its rounding order, and ``rounding_sensitivity`` is the
    noise floor the property test now also accepts."""
    from diagpass.testing import assert_fp32_within_noise_floor

    cfg = FamilyConfig(
        vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=None, ffn_kind="gelu_mlp",
        norm_placement="pre", norm_kind="rmsnorm", bias=False, rope=False, segment_size=4, num_mem_tokens=0,
        memory_kind="associative", d_mem=2, nu=2, memory_shift=1, detach_every=3,
    )
    model = build_family_model(cfg, seed=2)
    ids = torch.randint(0, 32, (2, 17), generator=torch.Generator().manual_seed(2))
    assert_equivalent(float64_copy(model), ids, options={"inner": "eager"}, expect_batched=True, rtol=1e-9, atol=1e-9)
    gap = assert_fp32_within_noise_floor(model, ids, options={"inner": "eager"})
    assert gap["floor"] > 10 * gap["own"]  # the model really is this ill-conditioned


def test_rrelu_in_training_is_random_and_eval_is_not():
    """rrelu draws its slopes in training: a random op (batching would change
    the stream); in eval it is a fixed leaky ReLU."""
    import torch.nn.functional as F

    from diagpass.fx_facts import is_random

    def f(x):
        return F.rrelu(x, training=True), F.rrelu(x, training=False), torch.nn.functional.rrelu(x)

    gm = torch.fx.symbolic_trace(f)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [is_random(n) for n in calls] == [True, False, False]


def test_a_gradient_eager_leaves_none_is_not_excused_as_rounding():
    """Session 19's bug class (a write projection only a dead update reads got a zero
    gradient where eager leaves None). The fallback rule, reached when the gradients miss
    rtol/atol for rounding, skipped None on either side, so such a gradient passed there:
    None and a zero tensor differ to an optimizer, so it refuses it now."""
    from diagpass.testing import assert_grads_as_exact_as_eager, gradients

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    expected = gradients(model, model, x)
    expected["0.bias"] = None  # as if eager never read it
    actual = {n: (torch.zeros(3) if g is None else g) for n, g in expected.items()}
    with pytest.raises(AssertionError, match="0.bias: gradient is unexpected"):
        assert_grads_as_exact_as_eager(model, (x,), {}, actual, expected)
    dropped = {**expected, "0.bias": torch.zeros(3), "2.weight": None}
    with pytest.raises(AssertionError, match="2.weight: gradient is missing"):
        assert_grads_as_exact_as_eager(model, (x,), {}, dropped, {**expected, "0.bias": torch.zeros(3)})
