"""diagpass.reports() and the report's picture (GraphReport.plot / DiagonalReport.plot)."""

import pytest
import torch

import diagpass
from diagpass.report import GraphReport
from tests.passes.conftest import PerLayerMemory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _compile_and_run(segments: int) -> GraphReport:
    torch.manual_seed(0)
    model = PerLayerMemory(layers=3)
    with torch.no_grad():
        torch.compile(model, backend="diagonal", options={"inner": "eager"})(torch.randn(1, 4 * segments, 8))
    return diagpass.reports()[-1]


def test_reports_lists_compiled_graphs_newest_last():
    before = len(diagpass.reports())
    first = _compile_and_run(5)
    torch._dynamo.reset()
    second = _compile_and_run(6)
    got = diagpass.reports()
    assert got[-2:] == [first, second] and len(got) == before + 2
    assert (first.num_segments, second.num_segments) == (5, 6)
    assert got[-1] is diagpass.reports()[-1]  # the module-level list stays the source
    got.clear()
    assert diagpass.reports()[-1] is second  # a copy: clearing it changes nothing


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    # IHDR: width and height of a real picture, not a blank 1x1
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100


def test_plot_writes_a_png_of_the_grid(tmp_path):
    report = _compile_and_run(5)
    fig = report.plot(tmp_path / "grid.png")
    _assert_png(tmp_path / "grid.png")
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (5, 3)
    assert [[int(v) for v in row] for row in grid] == [[s + l for l in range(3)] for s in range(5)]
    outlined = [p for p in ax.patches if p.get_edgecolor()[:3] == (0.0, 0.0, 0.0)]
    assert len(outlined) == sum(len(g) for g in report.batched_groups) == 13
    assert "5 batched groups (13 cells)" in ax.get_title()


def test_diagonal_report_plots_its_main_graph(tmp_path):
    model = PerLayerMemory(layers=3)
    explained = diagpass.explain(model, torch.randn(1, 4 * 4, 8))
    fig = explained.plot(tmp_path / "explain.png")
    _assert_png(tmp_path / "explain.png")
    assert fig.axes[0].images[0].get_array().shape == (4, 3)


def test_plot_without_a_grid_says_why():
    with pytest.raises(ValueError, match="no stack of identical layers"):
        GraphReport(reason="no stack of identical layers found").plot()
