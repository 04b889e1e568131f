"""Importer for users' own defect images into the "sem" Parquet schema (data/parquet_io.py).

Folder layout (PNG files only; hidden files such as .DS_Store are ignored):

    SRC/defect/<name>.png   an image with defects
    SRC/clean/<name>.png    its clean twin (a golden / reference image of the same field), paired by file name
    SRC/mask/<name>.png     optional: the defect mask (values 0 and 1, or 0 and 255); if the folder exists,
                            every pair needs one

Rows are in file-name order; sample_id is the file name without ".png". Pixel values: 8-bit greys / 255, 16-bit
greys / 65535, into [0, 1] float32. Greyscale PNGs are read as they are; RGB(A), palette and grey+alpha PNGs are
accepted when they are grey in fact (R = G = B, alpha fully opaque), otherwise refused, or converted to luma
(ITU-R 601, Pillow's "L") with `convert_colour=True`. All images must have one size (a table holds fixed-size
samples). pitch, line_width, roughness and noise are NaN (unknown for real images).

Columns:
    defect  the type index; `defect="bridge"` (a name from SEM_DEFECTS) sets it for every row, otherwise it is
            -1 with defect_name "unknown" (the schema allows -1)
    mask    with SRC/mask, the user's labels, and the extra column has_mask is True (then the schema does not ask
            for mask == (image != clean), which holds for synthetic twins, not for real image pairs). Without
            SRC/mask the mask is (image != clean), as the schema defines it, and has_mask is False, so evaluation
            can tell that it is no label.

Any problem — a missing folder, no images, an unpaired name, a file that is not a PNG, a colour image, a size
mismatch, a non-binary mask — raises DataImportError naming the file; nothing is written, since the table is only
handed to data.parquet_io.write_dataset (atomic) once it is complete.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from data.importers import DataImportError
from data.schema import SEM_DEFECTS, to_fixed_list

__all__ = ["import_defect_folder", "read_grey_png", "UNKNOWN_DEFECT"]

UNKNOWN_DEFECT = -1
_PARAM_COLUMNS = ("pitch", "line_width", "roughness", "noise")


def _png_names(folder: str, role: str) -> dict[str, str]:
    """{stem: path} of the PNGs in `folder`; refuses other files so that nothing is skipped silently."""
    if not os.path.isdir(folder):
        raise DataImportError(f"missing folder {folder} (the {role} images)")
    out: dict[str, str] = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            continue
        if not os.path.isfile(path):
            raise DataImportError(f"{path}: expected only .png files in {folder}, found a folder")
        stem, ext = os.path.splitext(entry)
        if ext.lower() != ".png":
            raise DataImportError(f"{path}: only .png files are read (convert it, or move it out of {folder})")
        if stem in out:
            raise DataImportError(f"{path}: two files named {stem!r} in {folder} (extension case differs)")
        out[stem] = path
    return out


def _read_levels(source: str | os.PathLike | BinaryIO, convert_colour: bool) -> tuple[np.ndarray, int]:
    """One PNG → (integer grey levels (H, W), full-scale value 255 or 65535); see the module doc for colour.

    source: a path or a binary file object (e.g. io.BytesIO of an HTTP upload, named "<upload>" in errors).
    """
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<upload>")
    try:
        with Image.open(source) as im:
            if im.format != "PNG":
                raise DataImportError(f"{path}: not a PNG image (Pillow reads it as {im.format})")
            im.load()
            mode = im.mode
            if mode in ("L", "1"):
                return np.asarray(im.convert("L"), dtype=np.int64), 255
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.int64)
                if a.min() < 0 or a.max() > 65535:
                    raise DataImportError(f"{path}: 32-bit grey values outside [0, 65535]")
                return a, 65535
            rgba = np.asarray(im.convert("RGBA"))
            if (rgba[..., 3] != 255).any():
                raise DataImportError(f"{path}: has transparent pixels (mode {mode}); save it without alpha")
            rgb = rgba[..., :3]
            if (rgb == rgb[..., :1]).all():  # grey stored as colour: lossless
                return rgb[..., 0].astype(np.int64), 255
            if not convert_colour:
                raise DataImportError(f"{path}: a colour image (mode {mode}, R, G, B differ); convert it to "
                                      f"greyscale, or pass convert_colour=True to use its luma")
            return np.asarray(im.convert("RGB").convert("L"), dtype=np.int64), 255
    except DataImportError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataImportError(f"{path}: not a readable image ({e})") from e


def read_grey_png(source: str | os.PathLike | BinaryIO, convert_colour: bool = False) -> np.ndarray:
    """One PNG (path or binary file object) → (H, W) float32 in [0, 1] (grey level / full scale)."""
    levels, full = _read_levels(source, convert_colour)
    return (levels / full).astype(np.float32)


def _read_mask(path: str) -> np.ndarray:
    """A mask PNG → (H, W) uint8 0/1; its values must be 0 and 1, or 0 and full scale (255, 65535)."""
    levels, full = _read_levels(path, convert_colour=False)
    values = np.unique(levels)
    if not (np.isin(values, (0, 1)).all() or np.isin(values, (0, full)).all()):
        raise DataImportError(f"{path}: a mask must hold two values, 0 and 1 or 0 and {full}; found "
                              f"{values[:8].tolist()}")
    return (levels > 0).astype(np.uint8)


def _unpaired(a: dict[str, str], b: dict[str, str], folder_a: str, folder_b: str) -> None:
    only_a = sorted(set(a) - set(b))
    if only_a:
        first = os.path.join(folder_a, os.path.basename(a[only_a[0]]))
        more = f" and {len(only_a) - 1} more" if len(only_a) > 1 else ""
        raise DataImportError(f"{first}{more}: no file of the same name in {folder_b}")


def import_defect_folder(src: str, *, defect: str | None = None, convert_colour: bool = False) -> pa.Table:
    """Read SRC/{defect,clean[,mask]}/*.png into a "sem" table (N rows, in file-name order); see the module doc.

    defect: a SEM_DEFECTS name for every row, or None for unknown (-1).
    """
    if defect is not None and defect not in SEM_DEFECTS:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {SEM_DEFECTS} or None (unknown)")
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise DataImportError(f"{src}: not a folder (expected {src}/defect/*.png and {src}/clean/*.png)")
    dirs = {role: os.path.join(src, role) for role in ("defect", "clean", "mask")}
    defects = _png_names(dirs["defect"], "defect")
    cleans = _png_names(dirs["clean"], "clean")
    masks = _png_names(dirs["mask"], "mask") if os.path.exists(dirs["mask"]) else None
    if not defects:
        raise DataImportError(f"{dirs['defect']}: no .png images")
    _unpaired(defects, cleans, dirs["defect"], dirs["clean"])
    _unpaired(cleans, defects, dirs["clean"], dirs["defect"])
    if masks is not None:
        _unpaired(defects, masks, dirs["defect"], dirs["mask"])
        _unpaired(masks, defects, dirs["mask"], dirs["defect"])

    names = sorted(defects)
    shape: tuple[int, int] | None = None
    first = ""
    images, twins, labels = [], [], []
    for name in names:
        img = read_grey_png(defects[name], convert_colour)
        clean = read_grey_png(cleans[name], convert_colour)
        if clean.shape != img.shape:
            raise DataImportError(f"{cleans[name]}: size {clean.shape[1]}x{clean.shape[0]} differs from its defect "
                                  f"image {defects[name]} ({img.shape[1]}x{img.shape[0]})")
        if shape is None:
            shape, first = img.shape, defects[name]
        elif img.shape != shape:
            raise DataImportError(f"{defects[name]}: size {img.shape[1]}x{img.shape[0]} differs from {first} "
                                  f"({shape[1]}x{shape[0]}); all images must have one size")
        if masks is not None:
            mask = _read_mask(masks[name])
            if mask.shape != img.shape:
                raise DataImportError(f"{masks[name]}: size {mask.shape[1]}x{mask.shape[0]} differs from its "
                                      f"defect image {defects[name]} ({img.shape[1]}x{img.shape[0]})")
        else:
            mask = (img != clean).astype(np.uint8)
        images.append(img)
        twins.append(clean)
        labels.append(mask)

    n = len(names)
    height, width = images[0].shape
    code = UNKNOWN_DEFECT if defect is None else SEM_DEFECTS.index(defect)
    nan = pa.array(np.full(n, np.nan, np.float32), type=pa.float32())
    return pa.table(
        {
            "image": to_fixed_list(np.stack(images)),
            "clean": to_fixed_list(np.stack(twins)),
            "mask": to_fixed_list(np.stack(labels)),
            "defect": pa.array(np.full(n, code), type=pa.int16()),
            "defect_name": pa.array([defect or "unknown"] * n, type=pa.string()),
            "sample_id": pa.array(names, type=pa.string()),
            **{key: nan for key in _PARAM_COLUMNS},
            "height": pa.array(np.full(n, height), type=pa.int32()),
            "width": pa.array(np.full(n, width), type=pa.int32()),
            "has_mask": pa.array(np.full(n, masks is not None), type=pa.bool_()),
        }
    )
