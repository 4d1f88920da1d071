"""Distribution plots: what each figure draws, from recorded frames, including NaN/Inf data."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from bitwidth.report.stats_plots import plot_drift, plot_log2_hist, plot_sqnr_heatmap, report_figures
from bitwidth.stats import record
from bitwidth.stats_analysis import analyze, sweep


@pytest.fixture(scope="module")
def rec():
    """Two layers, three snapshots; the second batch carries NaN and Inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with record(model, every=1, sample_size=1024) as r:
        for step in range(3):
            x = torch.randn(256, 8) * (step + 1)
            if step == 1:
                x[0, 0], x[1, 1] = float("nan"), float("inf")
            model(x).square().mean().backward()
            r.step()
    return r


def panel(fig: Figure, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_log2_hist_grid_bars_and_format_lines(rec):
    hist = rec.hist_frame()
    fig = plot_log2_hist(hist, ["fixed8_4", "int8"], step=1)
    assert len(fig.axes) == 2 * 3  # layers x kinds
    ax = panel(fig, "0 · activation")
    stats = rec.to_frame().query("layer == '0' and kind == 'activation' and step == 1").iloc[0]
    # Bar area is the fraction of nonzero finite values: NaN/Inf are counted apart, not drawn.
    area = sum(p.get_width() * p.get_height() for p in ax.patches if p.get_height() > 0 and p.get_width() < 5)
    assert area == pytest.approx(1 - stats["zero_frac"])
    assert all(np.isfinite([p.get_x(), p.get_height()]).all() for p in ax.patches)
    xs = [line.get_xdata()[0] for line in ax.lines]
    scale = np.float32(stats["absmax"]) / np.float32(127)
    expected = [-5.0, math.log2(127 / 16), math.log2(scale / 2), math.log2(scale * 127)]
    assert xs == pytest.approx(expected, abs=1e-6)  # fixed8_4 then int8: flush (dashed), clip (solid)
    assert [line.get_linestyle() for line in ax.lines] == ["--", "-", "--", "-"]


def test_log2_hist_family_pairs_follow_each_panel(rec):
    hist = rec.hist_frame()
    fig = plot_log2_hist(hist, [("fixed", 8)], layers=["2"], kinds=["gradient"], step=0)
    (ax,) = fig.axes
    absmax = rec.to_frame().query("layer == '2' and kind == 'gradient' and step == 0")["absmax"].iloc[0]
    clip = ax.lines[1].get_xdata()[0]
    assert 2**clip >= absmax > 2 ** (clip - 1)  # the binary point is placed for this layer's range


def test_log2_hist_rejects_bad_formats_and_tolerates_empty(rec):
    with pytest.raises(ValueError, match="unknown format"):
        plot_log2_hist(rec.hist_frame(), ["int8x"])
    empty = plot_log2_hist(rec.hist_frame(), layers=["nope"])
    assert "no histogram" in empty.axes[0].texts[0].get_text()


def test_sqnr_heatmap_shows_the_sweep(rec):
    sw = sweep(rec, "int", [2, 4, 8])
    fig = plot_sqnr_heatmap(sw, step=2)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    grid = images[0].get_array()  # weight panel: layers x bits
    want = sw[(sw["kind"] == "weight") & (sw["step"] == 2)].pivot(index="layer", columns="bits", values="sqnr_db")
    np.testing.assert_allclose(np.asarray(grid), want.to_numpy())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "4", "8"]


def test_sqnr_heatmap_by_format_marks_inf_and_missing():
    e = pd.DataFrame({"layer": ["a", "a", "b"], "kind": ["weight"] * 3, "format": ["int8", "e4m3", "int8"],
                      "family": ["int", "float", "int"], "bits": [8, 8, 8], "sqnr_db": [40.0, math.inf, 30.0]})
    fig = plot_sqnr_heatmap(e)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["e4m3", "int8"]  # two formats share 8 bits
    grid = ax.images[0].get_array()
    assert grid.mask.tolist() == [[False, False], [True, False]]  # b has no e4m3: grey
    assert grid[0, 0] == 40.0  # inf takes the top colour ...
    assert "inf" in [t.get_text() for t in ax.texts]  # ... and says so


def test_drift_lines_follow_the_stats_and_skip_non_finite(rec):
    stats = rec.to_frame()
    fig = plot_drift(stats, "absmax")
    ax = panel(fig, "activation")
    assert [line.get_label() for line in ax.lines] == ["0", "2"]
    want = stats.query("layer == '0' and kind == 'activation'").sort_values("step")["absmax"].to_numpy()
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), want)
    assert ax.get_yscale() == "log"
    bent = stats.assign(absmax=stats["absmax"].where(stats["step"] != 1, math.inf))
    y = panel(plot_drift(bent, "absmax"), "activation").lines[0].get_ydata()
    assert np.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()


def test_drift_needs_steps_and_a_known_statistic(rec):
    stats = rec.to_frame()
    with pytest.raises(ValueError, match="record with every=N"):
        plot_drift(stats.drop(columns="step"))
    with pytest.raises(ValueError, match="stat must be one of .*'kurtosis'"):
        plot_drift(stats, "median")


def test_report_figures_render_to_png(rec, tmp_path):
    figs = report_figures(rec.to_frame(), rec.hist_frame(), sweep(rec, "fixed", [4, 8]), family="fixed",
                          candidates=[4, 8])
    assert [name for name, _, _ in figs] == ["stats_log2_hist", "stats_sqnr", "stats_drift"]
    for name, fig, caption in figs:
        assert isinstance(fig, Figure) and caption
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    assert len(plot_sqnr_heatmap(analyze(rec, ["int4", "e4m3"])).axes) == 4  # 3 kinds + colour bar
