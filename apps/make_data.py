"""Generate synthetic fab data or import real data into Parquet (local path or s3://).

    python -m apps.make_data overlay --n 10000 --out data_out/overlay [--seed 0] [--size 32] [--log-dim 128]
    python -m apps.make_data wafer   --n 10000 --out s3://bucket/wafer [--class-weights none=8,Center=1]
    python -m apps.make_data sem     --n 2000  --out data_out/sem --size 64
    python -m apps.make_data mixed-wafer --n 6000 --out data_out/mixed [--size 52] [--class-weights Normal=4,C+EL=1]
    python -m apps.make_data import-mpom    SRC_DIR     --out PATH --scale-nm 30
    python -m apps.make_data import-wm811k  LSWMD.pkl   --out PATH [--size 32] [--limit N] [--trust-pickle]
    python -m apps.make_data import-cifar   cifar-10-python.tar.gz --out PATH
    python -m apps.make_data import-mixedwm38 Wafer_Map_Datasets.npz --out PATH [--size 52] [--limit N] [--eval-fraction 0.2]
    python -m apps.make_data import-defect-folder SRC_DIR --out PATH [--defect bridge] [--convert-colour]
                             (SRC_DIR/defect/*.png, SRC_DIR/clean/*.png paired by name, optional SRC_DIR/mask/*.png)

Schemas, generator physics and import formats: docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator

import pyarrow as pa
from tqdm import tqdm

from data.parquet_io import write_dataset


def _weights(text: str | None, what: str) -> dict[str, float] | None:
    """'A=1,B=2.5' -> {'A': 1.0, 'B': 2.5}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"--{what} expects NAME=WEIGHT pairs separated by commas, got {item!r}"
            )
        try:
            out[name.strip()] = float(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"--{what}: weight of {name!r} is not a number: {value!r}"
            ) from e
    return out


def _chunks(make: Callable[[int, int], pa.Table], n: int, chunk: int, desc: str) -> Iterator[pa.Table]:
    """Generate ``n`` rows in chunks (``make(count, start)``) with a progress bar."""
    with tqdm(total=n, desc=desc, unit="sample") as bar:
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            yield make(count, start)
            bar.update(count)


def _progress(tables: Iterator[pa.Table], desc: str) -> Iterator[pa.Table]:
    with tqdm(desc=desc, unit="sample") as bar:
        for t in tables:
            yield t
            bar.update(t.num_rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.make_data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, size: int) -> None:
        sp.add_argument("--n", type=int, required=True, help="number of samples")
        sp.add_argument(
            "--out", required=True, help="output dataset directory: local path or s3://bucket/prefix"
        )
        sp.add_argument("--seed", type=int, default=0, help="sample seed (same seed -> identical dataset)")
        sp.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
        sp.add_argument("--chunk", type=int, default=4096, help="samples per chunk / parquet file")

    ov = sub.add_parser("overlay", help="synthetic overlay maps (2xHxW, nm) with equipment logs")
    common(ov, 32)
    ov.add_argument("--log-dim", type=int, default=128, help="equipment-log vector length")
    ov.add_argument("--num-scanners", type=int, default=8)
    ov.add_argument("--num-chucks", type=int, default=2)
    ov.add_argument("--num-reticles", type=int, default=16)
    ov.add_argument("--noise-nm", type=float, default=0.5, help="measurement noise std (nm)")
    ov.add_argument("--fingerprint-seed", type=int, default=2024, help="fixes the machines' signatures")

    wf = sub.add_parser("wafer", help="synthetic WM-811K-style wafer maps (0 off, 1 pass, 2 fail)")
    common(wf, 32)
    wf.add_argument(
        "--class-weights", default=None, help="class mix, e.g. 'none=8,Center=1' (default uniform)"
    )

    mw = sub.add_parser("mixed-wafer", help="synthetic mixed-type wafer maps in MixedWM38's 38 classes (52x52)")
    common(mw, 52)
    mw.add_argument("--class-weights", default=None, help="38-class mix by name, e.g. 'Normal=4,C+EL=1' (default uniform)")

    sm = sub.add_parser("sem", help="synthetic SEM line/space images with defect, clean twin and mask")
    common(sm, 64)
    sm.add_argument("--defect-weights", default=None, help="defect mix, e.g. 'bridge=2,particle=1'")

    mp = sub.add_parser("import-mpom", help="import an MPOM folder of sample folders")
    mp.add_argument("src")
    mp.add_argument("--out", required=True)
    mp.add_argument(
        "--scale-nm", type=float, required=True, help="nm at PNG value 255 (0 -> -scale, 127.5 -> 0)"
    )
    mp.add_argument("--size", type=int, default=32)
    mp.add_argument("--log-dim", type=int, default=128)

    wm = sub.add_parser("import-wm811k", help="import WM-811K LSWMD.pkl")
    wm.add_argument("src")
    wm.add_argument("--out", required=True)
    wm.add_argument("--size", type=int, default=32)
    wm.add_argument("--limit", type=int, default=None, help="import only the first N rows")
    wm.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load with plain pandas.read_pickle (runs pickle code: only for files you trust)",
    )

    mx = sub.add_parser("import-mixedwm38", help="import MixedWM38's Wafer_Map_Datasets.npz (38 mixed-type classes)")
    mx.add_argument("src")
    mx.add_argument("--out", required=True)
    mx.add_argument("--size", type=int, default=52, help="map side after nearest-neighbour resize (default 52)")
    mx.add_argument("--limit", type=int, default=None, help="import only the first N maps")
    mx.add_argument("--eval-fraction", type=float, default=0.0,
                    help="hold out this share of maps (a seeded random split: the .npz is ordered by class) as "
                         "OUT/eval, the rest as OUT/train; 0 writes everything to OUT")

    cf = sub.add_parser("import-cifar", help="import cifar-10-python.tar.gz or cifar-100-python.tar.gz")
    cf.add_argument("src")
    cf.add_argument("--out", required=True)

    df = sub.add_parser("import-defect-folder",
                        help="import your own SEM pairs: SRC/defect/*.png + SRC/clean/*.png (+ SRC/mask/*.png)")
    df.add_argument("src")
    df.add_argument("--out", required=True)
    df.add_argument("--defect", default=None, help="defect type of every image (a SEM_DEFECTS name); default unknown")
    df.add_argument("--convert-colour", action="store_true", help="convert colour PNGs to grey instead of refusing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.command
    if cmd in ("overlay", "wafer", "mixed-wafer", "sem"):
        if args.n < 1 or args.chunk < 1:
            parser.error("--n and --chunk must be >= 1")
        if cmd == "overlay":
            from data.overlay import generate_overlay

            def make(count: int, start: int) -> pa.Table:
                return generate_overlay(
                    count,
                    args.seed,
                    height=args.size,
                    width=args.size,
                    log_dim=args.log_dim,
                    num_scanners=args.num_scanners,
                    num_chucks=args.num_chucks,
                    num_reticles=args.num_reticles,
                    noise_nm=args.noise_nm,
                    fingerprint_seed=args.fingerprint_seed,
                    start=start,
                )
        elif cmd == "wafer":
            from data.wafer import generate_wafer

            try:
                weights = _weights(args.class_weights, "class-weights")
            except argparse.ArgumentTypeError as e:
                parser.error(str(e))

            def make(count: int, start: int) -> pa.Table:
                return generate_wafer(count, args.seed, size=args.size, class_weights=weights, start=start)
        elif cmd == "mixed-wafer":
            from data.mixed_wafer import generate_mixed_wafer, mixed_class_probabilities

            try:
                weights = _weights(args.class_weights, "class-weights")
                mixed_class_probabilities(weights)  # unknown class names fail here, before anything is written
            except (argparse.ArgumentTypeError, ValueError, KeyError) as e:
                parser.error(str(e))

            def make(count: int, start: int) -> pa.Table:
                return generate_mixed_wafer(count, args.seed, size=args.size, class_weights=weights, start=start)
        else:
            from data.sem import generate_sem

            try:
                weights = _weights(args.defect_weights, "defect-weights")
            except argparse.ArgumentTypeError as e:
                parser.error(str(e))

            def make(count: int, start: int) -> pa.Table:
                return generate_sem(count, args.seed, size=args.size, defect_weights=weights, start=start)

        kind = "wafer" if cmd == "mixed-wafer" else cmd  # mixed maps are wafer tables with extra columns
        rows = write_dataset(_chunks(make, args.n, args.chunk, cmd), args.out, kind)
    else:
        from data import importers

        try:
            if cmd == "import-mpom":
                tables = importers.iter_mpom(
                    args.src, scale_nm=args.scale_nm, height=args.size, width=args.size, log_dim=args.log_dim
                )
                kind = "overlay"
            elif cmd == "import-wm811k":
                tables = importers.iter_wm811k(
                    args.src, size=args.size, trusted=args.trust_pickle, limit=args.limit
                )
                kind = "wafer"
            elif cmd == "import-defect-folder":
                from data.defect_folder import import_defect_folder

                tables = iter([import_defect_folder(args.src, defect=args.defect,
                                                    convert_colour=args.convert_colour)])
                kind = "sem"
            elif cmd == "import-mixedwm38":
                from data.mixed_wafer import import_mixedwm38

                if not 0.0 <= args.eval_fraction < 1.0:
                    parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
                table = import_mixedwm38(args.src, size=args.size, limit=args.limit)
                kind = "wafer"
                if args.eval_fraction > 0:
                    import numpy as np

                    order = np.random.default_rng(0).permutation(table.num_rows)
                    n_eval = max(1, round(args.eval_fraction * table.num_rows))
                    for part, rows_ in (("eval", order[:n_eval]), ("train", order[n_eval:])):
                        written = write_dataset(table.take(np.sort(rows_)), f"{args.out.rstrip('/')}/{part}", kind)
                        print(f"wrote {written} {kind} samples to {args.out.rstrip('/')}/{part}")
                    return 0
                tables = iter([table])
            else:
                tables = iter([importers.import_cifar(args.src)])
                kind = "image"
            rows = write_dataset(_progress(tables, cmd), args.out, kind)
        except importers.DataImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"wrote {rows} {kind} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
