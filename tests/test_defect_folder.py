"""data/defect_folder.py: PNG folders written here → "sem" tables; every bad input fails naming the file."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from data.defect_folder import import_defect_folder, read_grey_png
from data.importers import DataImportError
from data.parquet_io import from_fixed_list, read_dataset, validate_table, write_dataset


def _png(path, array) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, n: int = 3, size: tuple[int, int] = (8, 6), masks: bool = True) -> dict[str, np.ndarray]:
    """root/{defect,clean,mask}/img_i.png; returns the uint8 arrays written, stacked in name order."""
    rng = np.random.default_rng(0)
    h, w = size
    out: dict[str, list[np.ndarray]] = {"defect": [], "clean": [], "mask": []}
    for i in range(n):
        clean = rng.integers(0, 200, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[i % h, 1:3] = 1
        defect = np.where(mask == 1, 250, clean).astype(np.uint8)
        _png(os.path.join(root, "defect", f"img_{i}.png"), defect)
        _png(os.path.join(root, "clean", f"img_{i}.png"), clean)
        if masks:
            _png(os.path.join(root, "mask", f"img_{i}.png"), mask * 255)
        for key, arr in (("defect", defect), ("clean", clean), ("mask", mask)):
            out[key].append(arr)
    return {k: np.stack(v) for k, v in out.items()}


def _tree(root) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def test_round_trip_with_user_masks(tmp_path):
    written = make_folder(tmp_path, n=3)
    table = import_defect_folder(tmp_path)
    assert table.num_rows == 3 and table["sample_id"].to_pylist() == ["img_0", "img_1", "img_2"]
    assert table["height"].to_pylist() == [8] * 3 and table["width"].to_pylist() == [6] * 3
    image = from_fixed_list(table["image"], (8, 6))
    clean = from_fixed_list(table["clean"], (8, 6))
    assert image.dtype == np.float32 and np.array_equal(image, (written["defect"] / 255.0).astype(np.float32))
    assert np.array_equal(clean, (written["clean"] / 255.0).astype(np.float32))
    assert np.array_equal(from_fixed_list(table["mask"], (8, 6)), written["mask"])  # 0/255 PNG → 0/1
    assert table["defect"].to_pylist() == [-1] * 3 and table["defect_name"].to_pylist() == ["unknown"] * 3
    assert table["has_mask"].to_pylist() == [True] * 3
    assert all(np.isnan(v) for v in table["pitch"].to_pylist())
    # user masks and unknown types are a valid sem dataset: written and read back unchanged
    write_dataset(table, str(tmp_path / "out"), "sem")
    back = read_dataset(str(tmp_path / "out"))
    assert np.array_equal(from_fixed_list(back["mask"], (8, 6)), written["mask"])
    assert back["defect"].to_pylist() == [-1] * 3


def test_without_masks_with_a_defect_type_is_a_valid_sem_dataset(tmp_path):
    written = make_folder(tmp_path / "src", n=2, masks=False)
    table = import_defect_folder(tmp_path / "src", defect="bridge")
    validate_table(table, "sem")  # the mask is (image != clean), as the schema defines it
    assert table["has_mask"].to_pylist() == [False, False] and table["defect"].to_pylist() == [0, 0]
    write_dataset(table, str(tmp_path / "out"), "sem")
    back = read_dataset(str(tmp_path / "out"))
    assert np.array_equal(from_fixed_list(back["clean"], (8, 6)), (written["clean"] / 255.0).astype(np.float32))
    assert np.array_equal(from_fixed_list(back["mask"], (8, 6)), (written["defect"] != written["clean"]))
    with pytest.raises(ValueError, match="unknown defect type"):
        import_defect_folder(tmp_path / "src", defect="scratch")


def test_grey_colour_and_sixteen_bit_pngs(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _png(tmp_path / "rgb_grey.png", np.repeat(grey[..., None], 3, axis=2))
    assert np.array_equal(read_grey_png(str(tmp_path / "rgb_grey.png")), (grey / 255.0).astype(np.float32))
    colour = np.zeros((3, 4, 3), np.uint8)
    colour[..., 0] = 200
    _png(tmp_path / "red.png", colour)
    with pytest.raises(DataImportError, match="red.png: a colour image"):
        read_grey_png(str(tmp_path / "red.png"))
    # luma of pure red 200: Pillow's L = 0.299 R → 59.8, rounded to 60
    assert np.allclose(read_grey_png(str(tmp_path / "red.png"), convert_colour=True), 60 / 255.0)
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    _png(tmp_path / "deep.png", deep)
    assert np.allclose(read_grey_png(str(tmp_path / "deep.png")), deep / 65535.0)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 3] = 10
    _png(tmp_path / "clear.png", rgba)
    with pytest.raises(DataImportError, match="clear.png: has transparent pixels"):
        read_grey_png(str(tmp_path / "clear.png"))
    # uploads (file objects) read the same, and are named "<upload>" in errors
    assert np.array_equal(read_grey_png(io.BytesIO((tmp_path / "rgb_grey.png").read_bytes())), (grey / 255.0).astype(np.float32))
    with pytest.raises(DataImportError, match="<upload>: not a readable image"):
        read_grey_png(io.BytesIO(b"GIF89a not really"))


def _unpaired_defect(root):
    _png(os.path.join(root, "defect", "lonely.png"), np.zeros((8, 6), np.uint8))


def _unpaired_clean(root):
    _png(os.path.join(root, "clean", "lonely.png"), np.zeros((8, 6), np.uint8))


def _missing_mask(root):
    os.remove(os.path.join(root, "mask", "img_1.png"))


def _pair_sizes(root):
    _png(os.path.join(root, "clean", "img_1.png"), np.zeros((8, 7), np.uint8))


def _table_sizes(root):
    for role in ("defect", "clean", "mask"):
        _png(os.path.join(root, role, "img_2.png"), np.zeros((9, 6), np.uint8))


def _mask_size(root):
    _png(os.path.join(root, "mask", "img_0.png"), np.zeros((4, 6), np.uint8))


def _not_an_image(root):
    with open(os.path.join(root, "clean", "img_0.png"), "w") as f:
        f.write("not a png")


def _jpeg_named_png(root):
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(os.path.join(root, "defect", "img_0.png"), format="JPEG")


def _other_extension(root):
    _png(os.path.join(root, "defect", "img_9.tif"), np.zeros((8, 6), np.uint8))


def _colour(root):
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[..., 1] = 90
    _png(os.path.join(root, "defect", "img_1.png"), rgb)


def _grey_mask(root):
    _png(os.path.join(root, "mask", "img_2.png"), np.full((8, 6), 128, np.uint8))


def _empty(root):
    for name in os.listdir(os.path.join(root, "defect")):
        os.remove(os.path.join(root, "defect", name))


def _no_clean_folder(root):
    for name in os.listdir(os.path.join(root, "clean")):
        os.remove(os.path.join(root, "clean", name))
    os.rmdir(os.path.join(root, "clean"))


BAD = [
    (_unpaired_defect, r"defect/lonely\.png: no file of the same name in .*clean"),
    (_unpaired_clean, r"clean/lonely\.png: no file of the same name in .*defect"),
    (_missing_mask, r"defect/img_1\.png: no file of the same name in .*mask"),
    (_pair_sizes, r"clean/img_1\.png: size 7x8 differs from its defect image"),
    (_table_sizes, r"defect/img_2\.png: size 6x9 differs from .*img_0\.png \(6x8\)"),
    (_mask_size, r"mask/img_0\.png: size 6x4 differs"),
    (_not_an_image, r"clean/img_0\.png: not a readable image"),
    (_jpeg_named_png, r"defect/img_0\.png: not a PNG image"),
    (_other_extension, r"defect/img_9\.tif: only \.png files are read"),
    (_colour, r"defect/img_1\.png: a colour image"),
    (_grey_mask, r"mask/img_2\.png: a mask must hold two values"),
    (_empty, r"defect: no \.png images"),
    (_no_clean_folder, r"missing folder .*clean"),
]


@pytest.mark.parametrize("spoil, message", BAD, ids=[f.__name__.strip("_") for f, _ in BAD])
def test_bad_inputs_fail_naming_the_file_and_write_nothing(tmp_path, spoil, message):
    src = tmp_path / "src"
    make_folder(src, n=3)
    spoil(str(src))
    before = _tree(tmp_path)
    with pytest.raises(DataImportError, match=message):
        import_defect_folder(src)
    assert _tree(tmp_path) == before


def test_not_a_folder(tmp_path):
    with pytest.raises(DataImportError, match="not a folder"):
        import_defect_folder(tmp_path / "nowhere")


def test_make_data_imports_a_folder_and_refuses_a_bad_one(tmp_path, capsys):
    from apps.make_data import main

    make_folder(tmp_path / "src", n=2)
    assert main(["import-defect-folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert read_dataset(str(tmp_path / "out")).num_rows == 2
    os.remove(tmp_path / "src" / "clean" / "img_1.png")
    assert main(["import-defect-folder", str(tmp_path / "src"), "--out", str(tmp_path / "bad")]) == 2
    assert "img_1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
