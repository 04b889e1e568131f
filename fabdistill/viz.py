"""Pictures people would rather look at than read: overlay heat maps with a colour bar, simple line plots.

Pillow only (it comes with torchvision), so servers and CI draw the same pictures without a plotting stack.
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT = ImageFont.load_default()
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def diverging_rgb(values: np.ndarray, limit: float) -> np.ndarray:
    """Blue (−limit) → white (0) → red (+limit); (...,) floats -> (..., 3) uint8."""
    v = np.clip(np.asarray(values, dtype=np.float64) / max(limit, 1e-12), -1.0, 1.0)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    r = 1.0 - 0.75 * neg
    g = 1.0 - 0.85 * np.abs(v)
    b = 1.0 - 0.75 * pos
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, anchor: str = "la") -> None:
    draw.text(xy, text, fill=INK, font=_FONT, anchor=anchor)


def overlay_grid(
    maps_nm: np.ndarray,
    titles: Optional[Sequence[str]] = None,
    valid: Optional[np.ndarray] = None,
    cell: int = 96,
    columns: int = 4,
    limit_nm: Optional[float] = None,
    heading: str = "",
) -> Image.Image:
    """Overlay maps (N, 2, H, W) in nm as dx | dy heat-map pairs on a grid, with one shared colour bar.

    Off-wafer pixels (valid == 0) are drawn grey. The colour range is symmetric: ±limit_nm (default: the 99th
    percentile of |value|), so a glance compares magnitudes across maps.
    """
    maps = np.asarray(maps_nm, dtype=np.float64)
    if maps.ndim != 4 or maps.shape[1] != 2:
        raise ValueError(f"overlay maps must have shape (N, 2, H, W), got {maps.shape}")
    n = maps.shape[0]
    if limit_nm is None:
        on = maps[:, :, valid > 0] if valid is not None else maps
        limit_nm = float(np.percentile(np.abs(on), 99)) if on.size else 1.0
        limit_nm = max(limit_nm, 1e-3)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    pad, label_h, bar_w = 8, 14, 70
    pair_w = 2 * cell + pad
    top = pad + (label_h if heading else 0)
    width = pad + columns * (pair_w + pad) + bar_w
    height = top + rows * (cell + label_h + pad) + pad
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if heading:
        _text(draw, (pad, pad), heading)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = pad + c * (pair_w + pad)
        y0 = top + r * (cell + label_h + pad)
        _text(draw, (x0, y0), (titles[i] if titles is not None else f"#{i}") + "   dx | dy")
        for axis in range(2):
            rgb = diverging_rgb(maps[i, axis], limit_nm)
            if valid is not None:
                rgb[np.asarray(valid) <= 0] = (200, 200, 200)
            tile = Image.fromarray(rgb).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (x0 + axis * (cell + pad // 2), y0 + label_h))
    _colour_bar(draw, img, (width - bar_w + 6, top + label_h), max(rows * (cell + label_h + pad) - label_h - pad, 60),
                limit_nm)
    return img


def _colour_bar(draw: ImageDraw.ImageDraw, img: Image.Image, origin: tuple[int, int], length: int, limit: float) -> None:
    x, y = origin
    ramp = np.linspace(limit, -limit, length)[:, None].repeat(14, axis=1)
    img.paste(Image.fromarray(diverging_rgb(ramp, limit)), (x, y))
    draw.rectangle([x, y, x + 13, y + length - 1], outline=INK)
    for frac, value in ((0.0, limit), (0.5, 0.0), (1.0, -limit)):
        ty = y + int(frac * (length - 1))
        draw.line([x + 14, ty, x + 18, ty], fill=INK)
        _text(draw, (x + 20, ty), f"{value:+.1f}", anchor="lm")
    _text(draw, (x, y - 12), "nm")


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (520, 320),
) -> Image.Image:
    """Simple line/marker plot of named (x, y) series with axes, ticks and a legend."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    w, h = size
    left, right, top, bottom = 60, 20, 28, 40
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()]) if series else np.array([0.0, 1.0])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()]) if series else np.array([0.0, 1.0])
    finite = np.isfinite(ys)
    xmin, xmax = float(xs.min()), float(xs.max())
    ymin, ymax = (float(ys[finite].min()), float(ys[finite].max())) if finite.any() else (0.0, 1.0)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax = ymin + 1
    ypad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - ypad, ymax + ypad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xmin) / (xmax - xmin) * (w - left - right),
                h - bottom - (y - ymin) / (ymax - ymin) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline=INK)
    for k in range(5):
        fx, fy = xmin + k * (xmax - xmin) / 4, ymin + k * (ymax - ymin) / 4
        gx, _ = px(fx, ymin)
        _, gy = px(xmin, fy)
        draw.line([gx, h - bottom, gx, h - bottom + 4], fill=INK)
        _text(draw, (int(gx), h - bottom + 6), f"{fx:.3g}", anchor="ma")
        draw.line([left - 4, gy, left, gy], fill=INK)
        _text(draw, (left - 6, int(gy)), f"{fy:.3g}", anchor="rm")
    _text(draw, (w // 2, 6), title, anchor="ma")
    _text(draw, (w // 2, h - 14), xlabel, anchor="ma")
    _text(draw, (4, top - 14), ylabel)
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        points = [px(a, b) for a, b in zip(x, y) if np.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        _text(draw, (left + 8, top + 6 + 12 * i), f"— {name}")
        draw.line([left + 8, top + 12 + 12 * i, left + 14, top + 12 + 12 * i], fill=colour, width=3)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Image.Image, uri: str) -> None:
    """Save to a local path or s3:// URI."""
    from fabdistill import storage

    storage.write_bytes(uri, png_bytes(img))
