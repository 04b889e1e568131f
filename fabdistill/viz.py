"""Figures for reports, sweeps and served PNGs, drawn with matplotlib's object API (Figure + FigureCanvasAgg).

No pyplot anywhere: pyplot keeps global state (the current figure, a manager per open figure) that concurrent
requests in a Serve replica would share. A Figure built per call and rendered by its own FigureCanvasAgg belongs to
its caller alone (matplotlib caches fonts per thread), so servers and trainers can draw at the same time.

Figure kinds, each a function returning a ``matplotlib.figure.Figure``:

    overlay_quiver     overlay maps (N, 2, H, W) nm as arrows over the wafer outline and the exposure-field grid
    overlay_heatmaps   the same maps as dx | dy heat maps, one symmetric diverging colour bar in nm
    wafer_maps         wafer bin maps (N, H, W) {0 off-wafer, 1 pass, 2 fail} in the off / pass / fail palette
    class_grid         samples in rows = classes (wafer palette or grey), one image: DMD2's picture
    sem_images         grey images (N, H, W) with the true and predicted defect masks outlined
    score_maps         per-pixel score maps (N, H, W) with a colour bar (one per row if asked)
    training_curves    {name: (steps, values)} lines, legend outside the axes, optional log y
    sweep_plot         score vs a knob for trials, with the paper's values beside ours
    confusion_matrix   true vs predicted class, row-normalised

``save_figure(fig, uri)`` writes a PNG through fabdistill.storage (local or s3://); ``png_bytes`` encodes a Figure
or a PIL image (raw sample PNGs that are data rather than figures, e.g. a served translation, stay PIL images).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch

DPI = 100
WAFER_COLOURS = ("#ececec", "#46a05f", "#cd2d2d")  # 0 off-wafer, 1 pass, 2 fail (data/wafer.py OFF, PASS, FAIL)
WAFER_LABELS = ("off wafer", "pass", "fail")
OFF_WAFER = "#d4d4d4"  # off-wafer pixels of overlay heat maps
TRUE_MASK_COLOUR = "#00d8ff"  # cyan: the true defect mask
PRED_MASK_COLOUR = "#ff8c00"  # orange: the predicted mask
OVERLAY_CMAP = "RdBu_r"
WAFER_DIAMETER_MM = 300.0  # data/overlay.py grid_coordinates defaults
FIELD_MM = (26.0, 33.0)


# --------------------------------------------------------------------------- figures and files

def new_figure(width_in: float, height_in: float, constrained: bool = True) -> Figure:
    """A Figure with its own Agg canvas (no pyplot); constrained layout keeps labels, colour bars and outside
    legends from overlapping."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig_or_image: Any, compress_level: int = 6) -> bytes:
    """PNG bytes (RGB) of a matplotlib Figure or a PIL image. compress_level 1 encodes large figures several times
    faster for ~1.5× the bytes (served PNGs); 6 is Pillow's default (report files)."""
    from PIL import Image

    if isinstance(fig_or_image, Figure):
        canvas = fig_or_image.canvas
        if not isinstance(canvas, FigureCanvasAgg):
            canvas = FigureCanvasAgg(fig_or_image)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        image = Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")  # opaque white background: no alpha
    elif isinstance(fig_or_image, Image.Image):
        image = fig_or_image
    else:
        raise TypeError(f"png_bytes takes a matplotlib Figure or a PIL image, got {type(fig_or_image).__name__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_figure(fig: Any, uri: str) -> str:
    """Write a Figure (or PIL image) as PNG to a local path or s3:// URI; returns the URI."""
    from fabdistill import storage

    storage.write_bytes(uri, png_bytes(fig))
    return uri


class _Panels:
    """A grid of image panels laid out in inches (no layout engine: per-panel axes under constrained layout cost
    ~10 ms each to lay out). Each cell is a panel of `panel_in` plus room for its title; margins hold row labels
    (left), colour bars (right), the heading (top) and a legend (bottom)."""

    def __init__(self, n: int, columns: int, panel_in: tuple[float, float], heading: str = "", titles: int = 1,
                 left_in: float = 0.08, right_in: float = 0.08, bottom_in: float = 0.08, min_width_in: float = 0.0):
        if n < 1:
            raise ValueError("nothing to draw: no images")
        self.columns = max(1, min(columns, n))
        self.rows = math.ceil(n / self.columns)
        self.pw, self.ph = panel_in
        self.gap, self.title_in = 0.08, 0.06 + 0.13 * int(titles)  # `titles`: lines of panel title (0: none)
        self.left, self.right, self.bottom = left_in, right_in, bottom_in
        self.top = 0.08 + (0.32 if heading else 0.0)
        self.cw, self.ch = self.pw + self.gap, self.ph + self.title_in
        self.width = self.left + self.columns * self.cw + self.right
        if self.width < min_width_in:  # room for a bottom legend under few panels: centre the panels
            self.left += (min_width_in - self.width) / 2
            self.width = min_width_in
        self.height = self.top + self.rows * self.ch + self.bottom
        self.fig = new_figure(self.width, self.height, constrained=False)
        if heading:
            self.fig.suptitle(heading, fontsize=10, y=1 - 0.06 / self.height, va="top")
        flat = [self.fig.add_axes(self.box(i // self.columns, i % self.columns)) for i in range(n)]
        self.axes = [flat[r * self.columns:(r + 1) * self.columns] for r in range(self.rows)]

    def box(self, r: int, c: int) -> list[float]:
        """[left, bottom, width, height] of panel (r, c) in figure fractions."""
        x = self.left + c * self.cw + self.gap / 2
        y = self.height - self.top - (r + 1) * self.ch
        return [x / self.width, y / self.height, self.pw / self.width, self.ph / self.height]

    def colorbar_axes(self, first_row: int, last_row: int) -> Any:
        """Axes for a colour bar right of rows first_row..last_row (needs right_in ≥ ~0.9)."""
        y0 = self.height - self.top - (last_row + 1) * self.ch
        y1 = self.height - self.top - first_row * self.ch - self.title_in
        x = self.left + self.columns * self.cw + 0.1
        return self.fig.add_axes([x / self.width, y0 / self.height, 0.14 / self.width, (y1 - y0) / self.height])


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(titles: Sequence[str]) -> int:
    """Lines of the longest panel title (0 when every title is empty)."""
    return max((t.count("\n") + 1 for t in titles if t), default=0)


def _titles(titles: Sequence[str] | None, n: int, what: str) -> list[str]:
    if titles is None:
        return [f"#{i}" for i in range(n)]
    if len(titles) != n:
        raise ValueError(f"{what}: {len(titles)} titles for {n} images")
    return [str(t) for t in titles]


# --------------------------------------------------------------------------- overlay maps

def _overlay_array(maps_nm: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps_nm, dtype=np.float64)
    if maps.ndim != 4 or maps.shape[1] != 2:
        raise ValueError(f"overlay maps must have shape (N, 2, H, W), got {maps.shape}")
    mask = np.ones(maps.shape[-2:], bool) if valid is None else np.asarray(valid) > 0
    if mask.shape != maps.shape[-2:]:
        raise ValueError(f"valid mask {mask.shape} does not match the maps' {maps.shape[-2:]}")
    return maps, mask


def overlay_limit(maps_nm: np.ndarray, valid: np.ndarray | None = None, magnitude: bool = False) -> float:
    """Colour range of overlay figures: the 99th percentile of |dx|, |dy| (or of the vector length with
    magnitude=True) on the wafer, at least 1e-3 nm."""
    maps, mask = _overlay_array(maps_nm, valid)
    on = maps[:, :, mask]  # (N, 2, P)
    values = np.hypot(on[:, 0], on[:, 1]) if magnitude else np.abs(on)
    values = values[np.isfinite(values)]
    return max(float(np.percentile(values, 99)) if values.size else 1.0, 1e-3)


def _field_segments(wafer_diameter_mm: float, field_mm: tuple[float, float]) -> np.ndarray:
    """Exposure-field boundaries clipped to the wafer, as (K, 2, 2) segments in mm about the wafer centre: one
    field is centred on the wafer centre (data/overlay.py), so boundaries sit at (k + 1/2) · field pitch."""
    r = wafer_diameter_mm / 2.0
    segments = []
    for pitch, vertical in ((field_mm[0], True), (field_mm[1], False)):
        k = np.arange(-math.ceil(r / pitch) - 1, math.ceil(r / pitch) + 1)
        for c in pitch * (k + 0.5):
            if abs(c) < r:
                h = math.sqrt(r * r - c * c)
                segments.append([(c, -h), (c, h)] if vertical else [(-h, c), (h, c)])
    return np.asarray(segments, np.float64).reshape(-1, 2, 2)


class _WaferTiles:
    """Many wafers drawn on ONE axes in mm, tile i centred at centres[i]: a Serve replica draws 64 maps in a few
    hundred ms, where one axes per map would spend seconds on layout. Tiles are `per_tile` wafers wide (dx | dy
    pairs: 2), `columns` tiles per row, each with its title above, outlines and field grids in two collections."""

    def __init__(self, n: int, columns: int, per_tile: int, wafer_diameter_mm: float, tile_in: float,
                 heading: str, colorbar: bool = True):
        self.d = wafer_diameter_mm
        self.columns = max(1, min(columns, n))
        self.rows = math.ceil(n / self.columns)
        inner, outer, title = 0.05 * self.d, 0.22 * self.d, 0.2 * self.d
        self.tile_w = per_tile * self.d + (per_tile - 1) * inner
        self.step_x, self.step_y = self.tile_w + outer, self.d + title
        # centres[i][j]: wafer j of tile i (row 0 at the top: y decreases)
        self.centres = [[((i % self.columns) * self.step_x + j * (self.d + inner) + self.d / 2,
                          -(i // self.columns) * self.step_y - self.d / 2) for j in range(per_tile)] for i in range(n)]
        width_mm = self.columns * self.step_x - outer
        height_mm = self.rows * self.step_y
        per_mm = tile_in / self.d
        bar_in = 1.0 if colorbar else 0.1
        top_in = 0.1 + (0.3 if heading else 0.0)
        self.fig = new_figure(width_mm * per_mm + 0.2 + bar_in, height_mm * per_mm + top_in + 0.25, constrained=False)
        fw, fh = self.fig.get_size_inches()
        self.ax = self.fig.add_axes([0.1 / fw, 0.25 / fh, width_mm * per_mm / fw, height_mm * per_mm / fh])
        self.ax.set_xlim(-0.02 * self.d, width_mm + 0.02 * self.d)
        self.ax.set_ylim(-height_mm, title * 0.1)
        self.ax.set_aspect("equal")
        self.ax.set_axis_off()
        axes_h = height_mm * per_mm
        bar_h = min(0.9 * axes_h, 3.0)
        self.bar_box = [(0.2 + width_mm * per_mm) / fw, (0.25 + (axes_h - bar_h) / 2) / fh, 0.14 / fw, bar_h / fh]
        if heading:
            self.fig.suptitle(heading, fontsize=10, y=1 - 0.06 / fh, va="top")

    def title(self, i: int, text: str) -> None:
        (x0, y), (x1, _) = self.centres[i][0], self.centres[i][-1]
        self.ax.text((x0 + x1) / 2, y + self.d / 2 + 0.04 * self.d, text, ha="center", va="bottom", fontsize=7,
                     clip_on=False)

    def frames(self, field_mm: tuple[float, float], lw: float) -> None:
        """Every wafer's outline and exposure-field grid."""
        base = _field_segments(self.d, field_mm)
        centres = np.asarray([c for tile in self.centres for c in tile])  # (W, 2)
        segments = (base[None] + centres[:, None, None, :]).reshape(-1, 2, 2)
        self.ax.add_collection(LineCollection(segments, colors="#555555", linewidths=lw, alpha=0.55, zorder=2))
        circles = [Circle(tuple(c), self.d / 2) for c in centres]
        self.ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="#222222", linewidth=0.8,
                                               zorder=3))

    def colorbar(self, mappable: Any, label: str, ticks: Sequence[float] | None = None) -> Any:
        bar = self.fig.colorbar(mappable, cax=self.fig.add_axes(self.bar_box), ticks=ticks)
        bar.set_label(label)
        return bar


def overlay_heatmaps(maps_nm: np.ndarray, titles: Sequence[str] | None = None,
                     valid: np.ndarray | None = None, columns: int = 4, limit_nm: float | None = None,
                     heading: str = "", wafer_diameter_mm: float = WAFER_DIAMETER_MM,
                     field_mm: tuple[float, float] = FIELD_MM, tile_in: float = 1.3) -> Figure:
    """Overlay maps (N, 2, H, W) in nm as dx | dy heat-map pairs, `columns` maps per row, each over its wafer
    outline and exposure-field grid, with ONE colour bar labelled nm over the symmetric range ±limit_nm (default
    overlay_limit), so a glance compares magnitudes across maps. Off-wafer pixels (valid == 0) are grey."""
    maps, mask = _overlay_array(maps_nm, valid)
    n = maps.shape[0]
    names = _titles(titles, n, "overlay_heatmaps")
    limit = float(limit_nm) if limit_nm is not None else overlay_limit(maps, mask)
    tiles = _WaferTiles(n, columns, 2, wafer_diameter_mm, tile_in, heading)
    cmap = _cmap(OVERLAY_CMAP).with_extremes(bad=OFF_WAFER)
    norm = Normalize(-limit, limit)
    r = wafer_diameter_mm / 2.0
    im = None
    for i in range(n):
        for axis, (cx, cy) in enumerate(tiles.centres[i]):
            im = tiles.ax.imshow(np.ma.masked_where(~mask, maps[i, axis]), cmap=cmap, norm=norm,
                                 extent=(cx - r, cx + r, cy - r, cy + r), interpolation="nearest", zorder=1)
        tiles.title(i, f"{names[i]}   dx | dy")
    tiles.frames(field_mm, lw=0.5)
    tiles.colorbar(im, "nm", ticks=[-limit, 0.0, limit])
    return tiles.fig


def overlay_quiver(maps_nm: np.ndarray, titles: Sequence[str] | None = None, valid: np.ndarray | None = None,
                   columns: int = 4, limit_nm: float | None = None, heading: str = "", arrows: int = 16,
                   wafer_diameter_mm: float = WAFER_DIAMETER_MM, field_mm: tuple[float, float] = FIELD_MM,
                   tile_in: float = 2.2) -> Figure:
    """Overlay maps (N, 2, H, W) in nm as vector plots over each wafer's outline and exposure-field grid: an arrow
    at every k-th on-wafer pixel centre (about `arrows` across the wafer; data/overlay.py wafer coordinates, mm),
    all maps on one length scale (an arrow of limit_nm, default overlay_limit of the vector length, is 1.3 arrow
    spacings long), coloured by length with a colour bar in nm, and a key arrow."""
    from data.overlay import grid_coordinates

    maps, mask = _overlay_array(maps_nm, valid)
    n, _, h, w = maps.shape
    names = _titles(titles, n, "overlay_quiver")
    limit = float(limit_nm) if limit_nm is not None else overlay_limit(maps, mask, magnitude=True)
    coords = grid_coordinates(h, w, wafer_diameter_mm, field_mm)
    stride = max(1, math.ceil(max(h, w) / arrows))
    pick = np.zeros((h, w), bool)
    pick[stride // 2::stride, stride // 2::stride] = True
    pick &= mask
    scale = limit / (1.3 * stride * wafer_diameter_mm / max(h, w))  # nm per mm of arrow
    tiles = _WaferTiles(n, columns, 1, wafer_diameter_mm, tile_in, heading)
    xs, ys, us, vs = [], [], [], []
    for i in range(n):
        (cx, cy), = tiles.centres[i]
        xs.append(coords["X"][pick] + cx)
        ys.append(coords["Y"][pick] + cy)
        us.append(maps[i, 0][pick])
        vs.append(maps[i, 1][pick])
        tiles.title(i, names[i])
    u, v = np.concatenate(us), np.concatenate(vs)
    tiles.frames(field_mm, lw=0.4)
    q = tiles.ax.quiver(np.concatenate(xs), np.concatenate(ys), u, v, np.hypot(u, v), cmap="viridis",
                        norm=Normalize(0.0, limit), angles="xy", scale_units="xy", scale=scale, units="dots", width=1.6,
                        headwidth=3.5, headlength=4, headaxislength=3.5, zorder=4)
    x_last, y_last = tiles.centres[-1][0]
    tiles.ax.quiverkey(q, x_last + wafer_diameter_mm * 0.1, y_last - wafer_diameter_mm * 0.56, limit,
                       f"{limit:.3g} nm", labelpos="E", coordinates="data", fontproperties={"size": 7})
    tiles.colorbar(q, "overlay |d| (nm)")
    return tiles.fig


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


# --------------------------------------------------------------------------- wafer maps

WAFER_CMAP = ListedColormap(WAFER_COLOURS, name="wafer")
WAFER_NORM = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], WAFER_CMAP.N)


def _wafer_values(maps: np.ndarray) -> np.ndarray:
    m = np.rint(np.asarray(maps, dtype=np.float64))
    if m.size and (np.nanmin(m) < 0 or np.nanmax(m) > 2):
        raise ValueError(f"wafer map values must be 0 (off wafer), 1 (pass) or 2 (fail); got range "
                         f"[{np.nanmin(m):g}, {np.nanmax(m):g}]")
    return m


def _bottom_legend(fig: Figure, handles: list[Any]) -> None:
    """A one-line legend under the panels (constrained figures: outside the axes; others: in the bottom margin)."""
    loc = "outside lower center" if fig.get_layout_engine() is not None else "lower center"
    fig.legend(handles=handles, loc=loc, ncols=len(handles), fontsize=8, frameon=False, borderaxespad=0.1)


def _wafer_legend(fig: Figure) -> None:
    _bottom_legend(fig, [Patch(facecolor=c, edgecolor="#888888", label=lab)
                         for c, lab in zip(WAFER_COLOURS, WAFER_LABELS)])


def wafer_maps(maps: np.ndarray, titles: Sequence[str] | None = None, columns: int = 8, heading: str = "",
               title_colours: Sequence[str] | None = None) -> Figure:
    """Wafer bin maps (N, H, W) with values {0 off-wafer, 1 pass, 2 fail} in the off / pass / fail palette, one
    panel each with its title (e.g. the class), and a palette legend below. `title_colours` colours each title
    (e.g. red for a wrong prediction)."""
    m = _wafer_values(maps)
    if m.ndim != 3:
        raise ValueError(f"wafer maps must have shape (N, H, W), got {m.shape}")
    n = m.shape[0]
    names = _titles(titles, n, "wafer_maps")
    grid = _Panels(n, columns, (1.15, 1.15), heading, bottom_in=0.35, titles=_lines(names), min_width_in=3.0)
    for i, ax in enumerate(ax for row in grid.axes for ax in row):
        ax.imshow(m[i], cmap=WAFER_CMAP, norm=WAFER_NORM, interpolation="nearest")
        ax.set_title(names[i], fontsize=7, color=title_colours[i] if title_colours is not None else "black")
        _bare(ax)
    _wafer_legend(grid.fig)
    return grid.fig


def _mosaic(tiles: list[list[np.ndarray | None]], pad: int, fill: float) -> np.ndarray:
    """Rows of (H, W) tiles (None: empty) → one (R·(H+pad)−pad, C·(W+pad)−pad) array, gaps filled with `fill`."""
    h, w = next(t for row in tiles for t in row if t is not None).shape
    cols = max(len(row) for row in tiles)
    out = np.full((len(tiles) * (h + pad) - pad, cols * (w + pad) - pad), fill, np.float64)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
    return out


def class_grid(samples: np.ndarray, labels: np.ndarray, class_names: Sequence[str], kind: str = "wafer",
               per_row: int = 8, heading: str = "") -> Figure:
    """Samples (N, H, W) in rows = classes: one row per class present in `labels` (N,), its name at the left, up
    to per_row samples each. kind "wafer": {0, 1, 2} maps in the wafer palette with its legend; "grey": [0, 1]
    images (SEM). The tiles are one image on one axes, so a 9 × 8 grid draws as fast as one panel."""
    x = np.asarray(samples, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 3 or x.shape[0] != labels.shape[0]:
        raise ValueError(f"class_grid needs samples (N, H, W) and labels (N,), got {x.shape} and {labels.shape}")
    if kind not in ("wafer", "grey"):
        raise ValueError(f"class_grid kind must be 'wafer' or 'grey', got {kind!r}")
    classes = [c for c in range(len(class_names)) if (labels == c).any()]
    if not classes:
        raise ValueError(f"no sample has a label in 0..{len(class_names) - 1}")
    per_row = max(1, min(per_row, max(int((labels == c).sum()) for c in classes)))
    tiles = [[x[i] for i in np.flatnonzero(labels == c)[:per_row]] for c in classes]
    h = x.shape[1]
    pad = max(1, h // 16)
    if kind == "wafer":
        image = _mosaic([[_wafer_values(t) for t in row] for row in tiles], pad, np.nan)
        style: dict[str, Any] = {"cmap": WAFER_CMAP.with_extremes(bad="white"), "norm": WAFER_NORM}
    else:
        image = _mosaic(tiles, pad, np.nan)
        style = {"cmap": _cmap("gray").with_extremes(bad="white"), "vmin": 0.0, "vmax": 1.0}
    cell = max(0.45, min(1.1, 9.0 / per_row))
    fig = new_figure(1.4 + per_row * cell, 0.4 + len(classes) * cell + (0.4 if kind == "wafer" else 0.0)
                     + (0.3 if heading else 0.0))
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(image), interpolation="nearest", **style)
    ax.set_yticks([r * (h + pad) + (h - 1) / 2 for r in range(len(classes))], [str(class_names[c]) for c in classes],
                  fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if heading:
        ax.set_title(heading, fontsize=9)
    if kind == "wafer":
        _wafer_legend(fig)
    return fig


# --------------------------------------------------------------------------- SEM images and score maps

def _grey_or_wafer(ax: Any, image: np.ndarray, palette: str) -> None:
    if palette == "wafer":
        ax.imshow(_wafer_values(image), cmap=WAFER_CMAP, norm=WAFER_NORM, interpolation="nearest")
    elif palette == "grey":
        ax.imshow(np.asarray(image, np.float64), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        raise ValueError(f"palette must be 'grey' or 'wafer', got {palette!r}")


def _outline(ax: Any, mask: np.ndarray | None, colour: str) -> bool:
    """Contour of a boolean mask at 0.5; nothing (and no 'no contour levels' warning) for an empty/full mask."""
    if mask is None:
        return False
    m = np.asarray(mask, dtype=np.float64)
    if m.min() == m.max():
        return False
    ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.1)
    return True


def _masks(masks: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if masks is None:
        return None
    m = np.asarray(masks) > 0.5 if np.asarray(masks).dtype != bool else np.asarray(masks)
    if m.shape != shape:
        raise ValueError(f"{what} masks {m.shape} do not match the images {shape}")
    return m


def _row_labels(rows: list[list[Any]], labels: Sequence[str] | None) -> None:
    if labels is None:
        return
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} row labels for {len(rows)} rows")
    for row, label in zip(rows, labels):
        row[0].set_ylabel(str(label), fontsize=8)  # needs left_in for the text (_Panels)


def sem_images(images: np.ndarray, true_masks: np.ndarray | None = None,
               pred_masks: np.ndarray | None = None, titles: Sequence[str] | None = None, columns: int = 6,
               heading: str = "", row_labels: Sequence[str] | None = None, palette: str = "grey") -> Figure:
    """Images (N, H, W) (grey in [0, 1]; palette="wafer" for {0, 1, 2} wafer maps) with the true (cyan) and
    predicted (orange) defect masks (N, H, W) outlined as contours, and a legend naming the two. Either mask set
    may be None; an empty mask draws no outline. `row_labels` name the rows of the grid (e.g. the model)."""
    x = np.asarray(images)
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {x.shape}")
    true, pred = _masks(true_masks, x.shape, "true"), _masks(pred_masks, x.shape, "predicted")
    n = x.shape[0]
    names = _titles(titles, n, "sem_images") if titles is not None else [""] * n
    legend = true is not None or pred is not None
    grid = _Panels(n, columns, (1.2, 1.2), heading, titles=_lines(names), left_in=0.3 if row_labels else 0.08,
                   bottom_in=0.35 if legend else 0.08, min_width_in=3.6 if legend else 0.0)
    fig, rows = grid.fig, grid.axes
    for i, ax in enumerate(ax for row in rows for ax in row):
        _grey_or_wafer(ax, x[i], palette)
        _outline(ax, None if true is None else true[i], TRUE_MASK_COLOUR)
        _outline(ax, None if pred is None else pred[i], PRED_MASK_COLOUR)
        if names[i]:
            ax.set_title(names[i], fontsize=7)
        _bare(ax)
    _row_labels(rows, row_labels)
    if legend:
        handles = ([Line2D([], [], color=TRUE_MASK_COLOUR, lw=1.5, label="true defect mask")] if true is not None
                   else []) + ([Line2D([], [], color=PRED_MASK_COLOUR, lw=1.5, label="predicted mask")]
                               if pred is not None else [])
        _bottom_legend(fig, handles)
    return fig


def score_maps(scores: np.ndarray, titles: Sequence[str] | None = None, columns: int = 6, heading: str = "",
               vmax: float | None = None, label: str = "defect score", row_labels: Sequence[str] | None = None,
               per_row: bool = False, cmap: str = "magma") -> Figure:
    """Score maps (N, H, W) with a colour bar labelled `label` over [0, vmax] (default: the largest score). With
    per_row=True every row of the grid gets its own range and colour bar (models whose scores differ in scale)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3:
        raise ValueError(f"score maps must have shape (N, H, W), got {s.shape}")
    n = s.shape[0]
    names = _titles(titles, n, "score_maps") if titles is not None else [""] * n
    grid = _Panels(n, columns, (1.2, 1.2), heading, titles=_lines(names), left_in=0.3 if row_labels else 0.08,
                   right_in=1.0)
    fig, rows = grid.fig, grid.axes
    columns = grid.columns
    groups = [(r, r, row, s[r * columns:r * columns + len(row)]) for r, row in enumerate(rows)] if per_row else \
        [(0, len(rows) - 1, [ax for row in rows for ax in row], s)]
    for first, last, axes, values in groups:
        finite = values[np.isfinite(values)]
        top = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        top = top if top > 0 else 1.0
        im = None
        for ax, v in zip(axes, values):
            im = ax.imshow(v, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest")
            _bare(ax)
        bar = fig.colorbar(im, cax=grid.colorbar_axes(first, last))
        bar.set_label(label, fontsize=8)
    k = 0
    for row in rows:
        for ax in row:
            if names[k]:
                ax.set_title(names[k], fontsize=7)
            k += 1
    _row_labels(rows, row_labels)
    return fig


def images_grid(images: np.ndarray, titles: Sequence[str] | None = None, columns: int = 8, heading: str = "",
                title_colours: Sequence[str] | None = None) -> Figure:
    """Plain images (N, H, W) grey or (N, H, W, 3) RGB, values in [0, 1], with titles (e.g. true / predicted
    class of a classifier's held-out images)."""
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {x.shape}")
    n = x.shape[0]
    names = _titles(titles, n, "images_grid")
    grid = _Panels(n, columns, (1.15, 1.15), heading, titles=_lines(names))
    fig, rows = grid.fig, grid.axes
    for i, ax in enumerate(ax for row in rows for ax in row):
        ax.imshow(x[i], cmap="gray" if x.ndim == 3 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(names[i], fontsize=7, color=title_colours[i] if title_colours is not None else "black")
        _bare(ax)
    return fig


# --------------------------------------------------------------------------- curves

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def _line_style(count: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3.5} if count <= 40 else {}


def training_curves(series: Series, title: str = "", xlabel: str = "step", ylabel: str = "loss",
                    log_y: bool = False) -> Figure:
    """Named (steps, values) series as lines on labelled axes; the legend sits outside the axes (right), so it
    covers neither the curves nor the axis labels. log_y: logarithmic y axis (non-positive values are not drawn)."""
    if not series:
        raise ValueError("training_curves: no series to draw")
    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"series {name!r}: {x.shape[0]} steps but {y.shape[0]} values")
        ax.plot(x, y, label=str(name), linewidth=1.4, **_line_style(x.size))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both" if log_y else "major")
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def sweep_plot(trials: Series, xlabel: str, ylabel: str, title: str = "",
               paper: Mapping[float, float] | None = None, paper_label: str = "paper",
               paper_axis: bool = True) -> Figure:
    """Score vs a knob: one line per group of trials {name: (knob values, scores)}, and, when given, the published
    values {knob: score} as a dashed black line beside ours, on their own right-hand axis (paper_axis=True: the
    paper's scores come from another data set / N and are compared by trend) or on ours. Legend below the axes."""
    if not trials and not paper:
        raise ValueError("sweep_plot: nothing to draw")
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    handles = []
    for name, (xs, ys) in trials.items():
        order = np.argsort(np.asarray(xs, np.float64), kind="stable")
        x, y = np.asarray(xs, np.float64)[order], np.asarray(ys, np.float64)[order]
        handles += ax.plot(x, y, label=str(name), linewidth=1.5, **_line_style(x.size))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if paper:
        px = np.asarray(sorted(paper), np.float64)
        py = np.asarray([paper[k] for k in sorted(paper)], np.float64)
        target = ax.twinx() if paper_axis else ax
        handles += target.plot(px, py, linestyle="--", color="black", marker="s", markersize=4, label=paper_label)
        if paper_axis:
            target.set_ylabel(paper_label)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, max(1, len(handles))), fontsize=8)
    return fig


# --------------------------------------------------------------------------- classifiers

def confusion_matrix(true: np.ndarray, pred: np.ndarray, class_names: Sequence[str], title: str = "",
                     annotate: bool | None = None) -> Figure:
    """Row-normalised confusion matrix of labels true (N,) vs pred (N,) as a heat map (share of each true class
    predicted as each class, colour bar 0–1), class names on both axes; counts written in the cells for up to 16
    classes (annotate=None)."""
    t, p = np.asarray(true, np.int64).reshape(-1), np.asarray(pred, np.int64).reshape(-1)
    k = len(class_names)
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and predicted {p.shape} labels differ in length")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} ({k} class names)")
    counts = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(3.6, 1.6 + 0.28 * k)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    size = 8 if k <= 16 else 6
    ax.set_xticks(range(k), [str(c) for c in class_names], rotation=90 if k > 6 else 0, fontsize=size)
    ax.set_yticks(range(k), [str(c) for c in class_names], fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = float(np.trace(counts)) / max(int(counts.sum()), 1)
    ax.set_title(f"{title}{' | ' if title else ''}top-1 {accuracy:.3f} on {int(counts.sum())}", fontsize=10)
    if annotate if annotate is not None else k <= 16:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=max(5, size - 1),
                            color="white" if share[i, j] > 0.6 else "black")
    bar = fig.colorbar(im, ax=ax, shrink=0.85)
    bar.set_label("share of the true class")
    return fig


__all__ = ["DPI", "PRED_MASK_COLOUR", "TRUE_MASK_COLOUR", "WAFER_COLOURS", "WAFER_LABELS", "class_grid",
           "confusion_matrix", "images_grid", "new_figure", "overlay_heatmaps", "overlay_limit", "overlay_quiver",
           "png_bytes", "save_figure", "score_maps", "sem_images", "sweep_plot", "training_curves", "wafer_maps"]
