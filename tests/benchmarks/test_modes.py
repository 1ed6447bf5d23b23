"""Benchmark modes of issue 16: the even-load bound and the bound-share column (eager only,
tiny shapes, no compile: these check what the modes compute, not how fast)."""
import pytest
import torch

from benchmarks import report
from benchmarks.bound import build_bound
from diagpass.models.armt import build_armt, randomize_memory_


def _armt(T=8, M=2):
    m = build_armt("llama", hidden_size=32, num_layers=2, num_heads=2, segment_size=T, num_mem_tokens=M, d_mem=4)
    return randomize_memory_(m)


def test_bound_runs_the_steady_state_cell():
    """The bound's segment-1 row reads the memory segment 0 wrote, as ARMT's segment 1 does:
    same logits. Its segment-0 row reads that memory too, so it differs from ARMT's
    segment 0 (no read) -- the bound runs steady-state cells, not the read-less first cell.
    (Every row reads batch row 0's memory, so only row 0 is compared.)"""
    torch.manual_seed(0)
    m = _armt()
    x = torch.randint(0, 128, (2, 3 * 8))
    bound = build_bound(m, x)
    with torch.no_grad():
        ref = m(x[:, :16])
        got, states = bound(x[:, :16])
    assert got.shape == ref.shape
    torch.testing.assert_close(got[0, 8:16], ref[0, 8:16], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0, :8], ref[0, :8], atol=1e-4)
    assert len(states) == 2 and states[0][0].shape[0] == 2 * 2  # B*S rows


def test_bound_segments_are_independent_and_in_order():
    """Row b*S+s is segment s of batch row b: each segment alone gives the same logits."""
    m = _armt()
    x = torch.randint(0, 128, (2, 3 * 8))
    bound = build_bound(m, x)
    with torch.no_grad():
        whole, _ = bound(x)
        for s in range(3):
            part, _ = bound(x[:, 8 * s:8 * (s + 1)])
            torch.testing.assert_close(whole[:, 8 * s:8 * (s + 1)], part, rtol=1e-5, atol=1e-5)


def test_bound_share_formula():
    assert report.bound_share(100.0, 80.0, 60.0) == 0.5
    assert report.bound_share(100.0, 110.0, 60.0) == -0.25
    assert report.bound_share(100.0, 80.0, 100.0) is None  # no gain to share
    assert report.bound_share(None, 80.0, 60.0) is None


def test_table_shows_bound_share_and_fusions():
    res = [{"label": "p", "point": {}, "modes": {
        "inductor": {"median_ms": 100.0, "fusions": {}},
        "inductor_bl": {"median_ms": 95.0, "fusions": {"batch_linear": 3}},
        "diagonal": {"median_ms": 80.0},
        "bound": {"median_ms": 60.0}}}]
    md = report.markdown(res, {})
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| p |")}
    assert rows[report.MODE_NAMES["diagonal"]].rstrip(" |").endswith("50%")
    assert rows[report.MODE_NAMES["inductor_bl"]].rstrip(" |").endswith("12%")
    assert "Optimus: batch_linear x3" in rows[report.MODE_NAMES["inductor_bl"]]
    assert "Optimus: none fired" in rows[report.MODE_NAMES["inductor"]]
    assert rows[report.MODE_NAMES["bound"]].endswith("|  |")


@pytest.mark.slow  # Inductor compiles; CI runs -m slow too
def test_compile_modes_records_each_diagonal_report():
    """The runner's first-call pass on the quick config (no Inductor): every mode runs,
    and the diagonal modes carry the backend's report (a stale import broke this once)."""
    from benchmarks import runner
    from benchmarks.configs import CONFIGS

    point = CONFIGS["quick"].points()[0]
    fns, res, x = runner.compile_modes(point, ["eager", "diag_aot"], log=lambda *a: None)
    assert set(fns) == {"eager", "diag_aot"} and "error" not in res["diag_aot"]
    assert res["diag_aot"]["diag"]["batched"] is True and res["diag_aot"]["diag"]["num_wavefronts"] > 0


def test_table_names_a_measured_choice():
    res = [{"label": "p", "point": {}, "modes": {
        "inductor": {"median_ms": 100.0},
        "diagonal": {"median_ms": 99.0, "diag": {"batched": True, "num_wavefronts": 15,
                                                 "measured": {"chose": "sequential"}}}}}]
    rows = [line for line in report.markdown(res, {}).splitlines() if line.startswith("| p |")]
    assert any("measured: runs sequential" in line for line in rows)


def test_non_armt_points_build_the_family_model_with_that_memory():
    from benchmarks import configs, runner
    from diagpass.models.family import RecurrentTransformer

    shape = configs.Shape("t", 32, 2, 2, intermediate_size=64, model="gated")
    point = configs.Point(shape, 8, 2, 3)
    model = runner.build(point, base=False)
    assert isinstance(model, RecurrentTransformer) and model.config.memory_kind == "gated"
    with torch.no_grad():
        assert model(runner.inputs(point)).shape == (1, 24, shape.vocab_size)


def _family(kind="gated"):
    from diagpass.models.family import FamilyConfig, build_family_model

    cfg = FamilyConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64, segment_size=8,
                       num_mem_tokens=2, memory_kind=kind)
    return build_family_model(cfg, seed=0).eval()


@pytest.mark.parametrize("kind", ["gated", "associative", "xl_cache"])
def test_family_bound_runs_the_steady_state_cell(kind):
    """As ARMT's: the bound's segment-1 row equals the model's segment 1 (it reads the state
    segment 0 left), its segment-0 row does not (the model's segment 0 reads no state)."""
    from benchmarks.bound import build_family_bound

    torch.manual_seed(0)
    m = _family(kind)
    x = torch.randint(0, 128, (2, 3 * 8))
    bound = build_family_bound(m, x)
    with torch.no_grad():
        ref = m(x[:, :16])
        got, states = bound(x[:, :16])
        whole, _ = bound(x)
        part, _ = bound(x[:, 8:16])
    assert got.shape == ref.shape and len(states) == 2
    torch.testing.assert_close(got[0, 8:16], ref[0, 8:16], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0, :8], ref[0, :8], atol=1e-4)
    torch.testing.assert_close(whole[:, 8:16], part, rtol=1e-5, atol=1e-5)  # segments independent


def test_family_bound_is_refused_where_layers_share_no_per_layer_state():
    from benchmarks.bound import build_family_bound

    with pytest.raises(ValueError, match="memory state per layer"):
        build_family_bound(_family("rmt"), torch.zeros(1, 16, dtype=torch.long))


def test_the_sweep_builds_the_bound_of_a_family_point():
    from benchmarks.bound import FamilyEvenLoadBound
    from benchmarks.configs import CONFIGS
    from benchmarks.runner import build_for_mode

    (point,) = CONFIGS["sweep-gated"].points()
    assert isinstance(build_for_mode(point, "bound"), FamilyEvenLoadBound)
