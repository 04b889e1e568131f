"""fabdistill/viz.py figure kinds and fabdistill/reports.py, read back from the Figure objects (axes, labels, colour
bars and their ranges, quiver, contours, log scale, legend placement), not pixel by pixel; plus each figure written
as a PNG, served-figure rendering from several threads, and report.md with the pictures it links."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import to_rgba
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from matplotlib.quiver import Quiver
from PIL import Image

from fabdistill import viz

SIZE = 16


def written(fig: Figure, tmp_path: Path, name: str) -> Image.Image:
    """save_figure → a PNG file that PIL decodes (RGB, the figure's pixel size)."""
    uri = viz.save_figure(fig, str(tmp_path / f"{name}.png"))
    img = Image.open(uri)
    img.load()
    w, h = fig.get_size_inches() * fig.dpi
    assert img.format == "PNG" and img.mode == "RGB" and abs(img.size[0] - w) < 1 and abs(img.size[1] - h) < 1
    return img


def images_of(fig: Figure):
    return [im for ax in fig.axes for im in ax.get_images()]


def colour_bars(fig: Figure):
    return [im.colorbar for ax in fig.axes for im in list(ax.get_images()) + list(ax.collections)
            if getattr(im, "colorbar", None) is not None]


@pytest.fixture(scope="module")
def overlay():
    from data.overlay import generate_overlay, grid_coordinates
    from data.parquet_io import from_fixed_list

    table = generate_overlay(3, seed=5, height=SIZE, width=SIZE)
    return from_fixed_list(table.column("overlay"), (2, SIZE, SIZE)), grid_coordinates(SIZE, SIZE)["valid"]


@pytest.fixture(scope="module")
def wafers():
    from data.parquet_io import from_fixed_list
    from data.wafer import generate_wafer

    table = generate_wafer(12, seed=3, size=SIZE)
    return from_fixed_list(table.column("wafer_map"), (SIZE, SIZE)), table.column("label").to_numpy()


@pytest.fixture(scope="module")
def sem():
    from data.parquet_io import from_fixed_list
    from data.sem import generate_sem

    table = generate_sem(3, seed=2, size=32)
    images = from_fixed_list(table.column("image"), (32, 32)).astype(np.float64)
    return images, from_fixed_list(table.column("mask"), (32, 32)) > 0


# --------------------------------------------------------------------------- overlay maps

FIELD_LINES = 12 + 10  # 26 mm fields: boundaries at ±13 … ±143 mm; 33 mm: ±16.5 … ±148.5 (300 mm wafer)


def _frames(ax, wafers: int):
    lines = [c for c in ax.collections if isinstance(c, LineCollection) and not isinstance(c, Quiver)]
    circles = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(lines) == 1 and len(circles) == 1 and len(circles[0].get_paths()) == wafers
    segments = lines[0].get_segments()
    assert len(segments) == FIELD_LINES * wafers
    return segments


def test_overlay_heatmaps_symmetric_nm_colour_bar_over_wafer_and_field_grid(overlay, tmp_path):
    maps, valid = overlay
    fig = viz.overlay_heatmaps(maps, ["a", "b", "c"], valid=valid, columns=2, heading="three maps")
    images = images_of(fig)
    assert len(images) == 2 * 3  # dx and dy of each map
    limit = float(np.percentile(np.abs(maps[:, :, valid]), 99))  # the data's limit, on the wafer only
    assert viz.overlay_limit(maps, valid) == pytest.approx(limit)
    for im in images:
        low, high = im.get_clim()
        assert low == pytest.approx(-limit) and high == pytest.approx(limit)  # symmetric around 0
        assert np.array_equal(np.ma.getmaskarray(im.get_array()), ~valid)  # off-wafer pixels masked (grey)
    bars = colour_bars(fig)
    assert len(bars) == 1 and bars[0].ax.get_ylabel() == "nm"
    assert list(bars[0].get_ticks()) == pytest.approx([-limit, 0.0, limit])
    main = images[0].axes
    texts = [t.get_text() for t in main.texts]
    assert texts == ["a   dx | dy", "b   dx | dy", "c   dx | dy"] and fig._suptitle.get_text() == "three maps"
    # every field boundary is a chord of its wafer's circle (radius 150 mm about the tile's centre)
    segments = _frames(main, 6)
    centres = np.asarray([[p.get_extents().x0 + 150.0, p.get_extents().y0 + 150.0]
                         for p in main.collections[-1].get_paths()])
    for seg in segments[:FIELD_LINES]:
        assert np.hypot(*(seg - centres[0]).T) == pytest.approx([150.0, 150.0], abs=1.0)
    np.testing.assert_allclose(images[0].get_array().data[valid], maps[0, 0][valid])
    fixed = viz.overlay_heatmaps(maps, valid=valid, limit_nm=5.0)
    assert all(im.get_clim() == (-5.0, 5.0) for im in images_of(fixed))
    written(fig, tmp_path, "heat")
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        viz.overlay_heatmaps(maps[:, 0], valid=valid)


def test_overlay_quiver_draws_arrows_with_one_scale_and_a_colour_bar(overlay, tmp_path):
    maps, valid = overlay
    fig = viz.overlay_quiver(maps, valid=valid, columns=3, arrows=8)
    ax = fig.axes[0]
    quivers = [c for c in ax.collections if isinstance(c, Quiver)]
    assert len(quivers) == 1
    q = quivers[0]
    stride = math.ceil(SIZE / 8)
    pick = np.zeros((SIZE, SIZE), bool)
    pick[stride // 2::stride, stride // 2::stride] = True
    pick &= valid
    assert q.N == 3 * int(pick.sum())
    np.testing.assert_allclose(q.U, np.concatenate([m[0][pick] for m in maps]))
    np.testing.assert_allclose(q.V, np.concatenate([m[1][pick] for m in maps]))
    limit = float(np.percentile(np.hypot(maps[:, 0], maps[:, 1])[:, valid], 99))
    assert q.norm.vmin == 0.0 and q.norm.vmax == pytest.approx(limit)
    bars = colour_bars(fig)
    assert len(bars) == 1 and bars[0].ax.get_ylabel() == "overlay |d| (nm)"
    _frames(ax, 3)
    assert [t.get_text() for t in ax.texts] == ["#0", "#1", "#2"]
    written(fig, tmp_path, "quiver")


# --------------------------------------------------------------------------- wafer maps

def test_wafer_maps_palette_titles_and_legend(wafers, tmp_path):
    from data.schema import WAFER_CLASSES

    maps, labels = wafers
    titles = [WAFER_CLASSES[c] for c in labels[:6]]
    fig = viz.wafer_maps(maps[:6], titles, columns=3, title_colours=["red"] + ["black"] * 5)
    assert [ax.get_title() for ax in fig.axes] == titles
    assert fig.axes[0].title.get_color() == "red"
    im = fig.axes[0].get_images()[0]
    assert tuple(im.cmap.colors) == viz.WAFER_COLOURS and tuple(im.norm.boundaries) == (-0.5, 0.5, 1.5, 2.5)
    np.testing.assert_array_equal(im.get_array(), maps[0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["off wafer", "pass", "fail"]
    written(fig, tmp_path, "wafer")
    with pytest.raises(ValueError, match="0 \\(off wafer\\), 1 \\(pass\\) or 2 \\(fail\\)"):
        viz.wafer_maps(maps[:2] + 3)


def test_class_grid_rows_are_classes_for_wafer_maps_and_sem(wafers, sem, tmp_path):
    from data.schema import SEM_DEFECTS, WAFER_CLASSES
    from fabdistill.inference.dmd2 import class_grid as dmd2_grid

    maps, labels = wafers
    fig = viz.class_grid(maps, labels, WAFER_CLASSES, per_row=4, heading="real")
    ax = fig.axes[0]
    present = [WAFER_CLASSES[c] for c in sorted(set(labels.tolist()))]
    assert [t.get_text() for t in ax.get_yticklabels()] == present and ax.get_title() == "real"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["off wafer", "pass", "fail"]
    # DMD2's wrapper takes native (N, 1, H, W) samples of its domain
    same = dmd2_grid(maps[:, None].astype(np.float32), labels, WAFER_CLASSES, "wafer", per_row=4)
    np.testing.assert_array_equal(same.axes[0].get_images()[0].get_array(), ax.get_images()[0].get_array())
    images, _ = sem
    grey = dmd2_grid(images[:, None], np.array([0, 2, 2]), SEM_DEFECTS, "sem")
    assert grey.axes[0].get_images()[0].get_clim() == (0.0, 1.0) and not grey.legends
    assert [t.get_text() for t in grey.axes[0].get_yticklabels()] == [SEM_DEFECTS[0], SEM_DEFECTS[2]]
    written(fig, tmp_path, "class_wafer")
    written(grey, tmp_path, "class_sem")


# --------------------------------------------------------------------------- SEM images and score maps

def _contours(ax) -> list:
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def test_sem_images_outline_true_and_predicted_masks(sem, tmp_path):
    images, true = sem
    pred = np.roll(true, 2, axis=2)
    pred[2] = False  # nothing predicted on the last image: its predicted outline is absent
    fig = viz.sem_images(images, true, pred, titles=["x", "y", "z"], row_labels=["input"], heading="SEM")
    assert [ax.get_title() for ax in fig.axes] == ["x", "y", "z"] and fig.axes[0].get_ylabel() == "input"
    for i, ax in enumerate(fig.axes):
        sets = _contours(ax)
        assert len(sets) == (2 if i < 2 else 1)
        assert tuple(sets[0].get_edgecolor()[0]) == pytest.approx(to_rgba(viz.TRUE_MASK_COLOUR))
        if i < 2:
            assert tuple(sets[1].get_edgecolor()[0]) == pytest.approx(to_rgba(viz.PRED_MASK_COLOUR))
        assert ax.get_images()[0].get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["true defect mask", "predicted mask"]
    plain = viz.sem_images(images)
    assert not plain.legends and not any(_contours(ax) for ax in plain.axes)
    written(fig, tmp_path, "sem")
    with pytest.raises(ValueError, match="true masks"):
        viz.sem_images(images, true[:, :8])


def test_score_maps_colour_bar_shared_or_per_row(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0, 1, (3, 8, 8)), rng.uniform(0, 5, (3, 8, 8))])
    shared = viz.score_maps(scores, columns=3)
    bars = colour_bars(shared)
    assert len(bars) == 1 and bars[0].ax.get_ylabel() == "defect score"
    assert all(im.get_clim() == (0.0, pytest.approx(scores.max())) for im in images_of(shared))
    rows = viz.score_maps(scores, columns=3, per_row=True, row_labels=["ae", "kdcddm"], label="score")
    assert len(colour_bars(rows)) == 2
    panels = [ax for ax in rows.axes if ax.get_images()]
    assert panels[0].get_ylabel() == "ae" and panels[3].get_ylabel() == "kdcddm"
    assert panels[0].get_images()[0].get_clim()[1] == pytest.approx(scores[:3].max())
    assert panels[3].get_images()[0].get_clim()[1] == pytest.approx(scores[3:].max())
    written(rows, tmp_path, "scores")


def test_kdcddm_wafer_columns_use_the_wafer_palette(wafers):
    from fabdistill.inference.kdcddm import columns_grid

    maps, _ = wafers
    defect = maps[:2] / 2.0  # KDCDDM's wafer images: map / 2 in [0, 1]
    fig = columns_grid([("input", defect), ("clean", defect)], "wafer", true=maps[:2] == 2, pred=maps[:2] == 2,
                       outlined=("input",))
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(), maps[0])
    assert tuple(fig.axes[0].get_images()[0].cmap.colors) == viz.WAFER_COLOURS
    assert len(_contours(fig.axes[0])) == 2 and not _contours(fig.axes[1])  # outlines on the input column only


# --------------------------------------------------------------------------- curves

def _legend_clear_of_labels(fig: Figure) -> None:
    """The legend overlaps neither the axes' data area nor any axis label."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
        for label in (ax.xaxis.label, ax.yaxis.label):
            if label.get_text():
                assert not legend.overlaps(label.get_window_extent(renderer))


def test_training_curves_labels_legend_outside_and_log_scale(tmp_path):
    steps = np.arange(1, 41)
    series = {"teacher loss": (steps, 1 / steps), "student loss": (steps, 2 / steps)}
    fig = viz.training_curves(series, title="training loss", log_y=True)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "training loss")
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["teacher loss", "student loss"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), 2 / steps)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["teacher loss", "student loss"]
    _legend_clear_of_labels(fig)
    assert viz.training_curves(series, ylabel="MSE").axes[0].get_yscale() == "linear"
    written(fig, tmp_path, "curves")
    with pytest.raises(ValueError, match="3 steps but 2 values"):
        viz.training_curves({"x": ([1, 2, 3], [1, 2])})


def test_sweep_plot_puts_the_papers_values_beside_ours(tmp_path):
    ours = {"this sweep": ([0.5, 0.0, 0.25], [44.9, 38.1, 38.5])}
    paper = {0.0: 27.46, 0.25: 26.06, 0.5: 24.66, 0.7: 123.85}
    fig = viz.sweep_plot(ours, "Mask Ratio", "FID-500", title="FID vs mask ratio", paper=paper,
                         paper_label="paper FID-15k")
    ax, twin = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("Mask Ratio", "FID-500", "FID vs mask ratio")
    assert twin.get_ylabel() == "paper FID-15k"
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), [0.0, 0.25, 0.5])  # sorted by knob
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [38.1, 38.5, 44.9])
    np.testing.assert_allclose(twin.get_lines()[0].get_ydata(), [27.46, 26.06, 24.66, 123.85])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["this sweep", "paper FID-15k"]
    _legend_clear_of_labels(fig)
    same_axis = viz.sweep_plot(ours, "Mask Ratio", "FID", paper=paper, paper_axis=False)
    assert len(same_axis.axes) == 1 and len(same_axis.axes[0].get_lines()) == 2
    written(fig, tmp_path, "sweep")


def test_tune_score_plot_uses_the_sweep_plot_with_the_papers_ablation():
    from tune.report import STATUS_FINISHED, score_plot
    from tune.spaces import ScoreSettings, get_space, parse_axis

    space = get_space("ikddit")
    rows = [{"mask_ratio": m, "status": STATUS_FINISHED, "steps": 4, "fid": f}
            for m, f in ((0.5, 44.9), (0.0, 38.1), (0.25, 38.5))]
    fig = score_plot(rows, "mask_ratio", space, {"mask_ratio": parse_axis("mask_ratio", [0, 0.25, 0.5])},
                     ScoreSettings(n=500))
    ax, twin = fig.axes
    assert ax.get_xlabel() == space.label("mask_ratio") and ax.get_ylabel() == "FID-500"
    assert twin.get_ylabel() == space.reference_label
    np.testing.assert_allclose(twin.get_lines()[0].get_xdata(), sorted(space.reference["mask_ratio"]))


def test_confusion_matrix_shares_labels_and_range(tmp_path):
    true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0, 2])
    fig = viz.confusion_matrix(true, pred, ["A", "B", "C"], title="teacher")
    ax = fig.axes[0]
    im = ax.get_images()[0]
    np.testing.assert_allclose(im.get_array(), [[2 / 3, 1 / 3, 0], [0, 1, 0], [0.2, 0, 0.8]])
    assert im.get_clim() == (0.0, 1.0) and im.colorbar.ax.get_ylabel() == "share of the true class"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert ax.get_title() == "teacher | top-1 0.800 on 10"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B", "C"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["2", "1", "2", "4", "1"])  # counts in the cells
    written(fig, tmp_path, "confusion")
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        viz.confusion_matrix(true, pred + 1, ["A", "B", "C"])


# --------------------------------------------------------------------------- PNG bytes, threads

def test_png_bytes_of_figures_and_pil_images_and_from_many_threads(overlay, wafers):
    from data.schema import WAFER_CLASSES

    maps, valid = overlay
    wmaps, labels = wafers
    raw = Image.fromarray(np.zeros((4, 6), np.uint8), "L")
    assert Image.open(io.BytesIO(viz.png_bytes(raw))).size == (6, 4)  # raw sample PNGs stay as they are
    with pytest.raises(TypeError, match="Figure or a PIL image"):
        viz.png_bytes(np.zeros((2, 2)))

    def draw(i: int) -> bytes:  # what served students do per request: a Figure per call, no pyplot
        if i % 2:
            return viz.png_bytes(viz.class_grid(wmaps, labels, WAFER_CLASSES, per_row=3), compress_level=1)
        return viz.png_bytes(viz.overlay_heatmaps(maps, valid=valid, heading=f"request {i % 4}"), compress_level=1)

    alone = [draw(i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, range(8)))
    assert together == alone + alone  # concurrent figures do not disturb each other


# --------------------------------------------------------------------------- reports

def test_write_report_links_every_figure_it_writes(tmp_path):
    from fabdistill.methods import EvalTable
    from fabdistill.reports import figure_file, linked_pictures, write_report

    table = EvalTable(title="t", columns={"model": ("model", ""), "top1": ("top-1", ".3f")},
                      rows=[{"model": "a", "top1": 0.5}])
    curves = viz.training_curves({"loss": ([1, 2], [1.0, 0.5])})
    path = write_report(str(tmp_path / "r"), "Some evaluation", table,
                        {"confusion a": viz.confusion_matrix([0, 1], [0, 1], ["x", "y"]), "missing": None,
                         "Training curves": curves}, notes=["- a note"], intro=["intro line"])
    text = Path(path).read_text()
    assert text.startswith("# Some evaluation\n\nintro line\n\n**t**") and "- a note" in text and "| a | 0.500 |" in text
    pictures = linked_pictures(path)
    assert [Path(p).name for p in pictures] == ["confusion_a.png", "training_curves.png"]
    assert all(Path(p).stat().st_size > 0 for p in pictures)
    assert (tmp_path / "r" / "metrics.json").is_file() and "missing" not in text
    assert figure_file("teacher Heun 35 NFE") == "teacher_heun_35_nfe.png"
    with pytest.raises(ValueError, match="both be written to a_b.png"):
        write_report(str(tmp_path / "r2"), "x", table, {"a b": curves, "a-b": curves})


def test_run_curves_from_metrics_jsonl_of_checkpoint_or_run_folder(tmp_path):
    from fabdistill.reports import metric_series, run_curves, run_folder
    from trainers.launch import append_jsonl

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for step, loss in ((1, 1.0), (2, 0.5), (3, float("nan"))):
        append_jsonl(str(run / "metrics.jsonl"), {"step": step, "train_loss": loss, "train_acc": 0.1 * step})
    append_jsonl(str(run / "metrics.jsonl"), {"final": True, "train_loss": 0.1})  # no step: not a point
    assert run_folder(str(run / "model")) == str(run) and run_folder(str(run)) == str(run)
    assert run_folder(str(tmp_path)) is None
    fig = run_curves({"teacher": str(run / "model"), "again": str(run), "none": str(tmp_path)})
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["teacher / again train_loss"]  # one run, drawn once
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1.0, 0.5])  # NaN and step-less rows skipped
    assert ax.get_yscale() == "log"
    acc = run_curves({"t": str(run)}, match=("acc",), ylabel="accuracy", log_y=False)
    assert acc.axes[0].get_yscale() == "linear" and acc.axes[0].get_ylabel() == "accuracy"
    assert metric_series({"fast_ad": [{"student_step": 5, "kd_loss": 2.0}]}) == {"fast_ad kd_loss": ([5.0], [2.0])}
    assert run_curves({"none": str(tmp_path)}) is None
