"""Checkpoint folders, weights only: `state.pt` (tensors, state dicts, numbers; loaded with weights_only=True, so a
file cannot run code) and `meta.json` (what the state is: method, role, model config, step).

Used by training (trainers/launch.py writes them) and by inference (fabdistill/inference, serve/) alike.
:func:`load_weights` is the one weights-only `torch.load` of the project (checkpoints, feature-extractor and
Inception weights): a damaged file or one holding pickled Python objects is refused with an error naming the file
and the problem, never with PyTorch's advice to load it unsafely.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fabdistill import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# torch.save's legacy (pre-1.6, non-zip) files start with this magic number, pickled after a PROTO opcode.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
NOT_AN_ARCHIVE = "not a valid checkpoint archive"
NOT_WEIGHTS = "that is not plain weights; fabdistill loads weights only (tensors, state dicts, numbers, strings)"


class WeightsFileError(ValueError):
    """A weights file that cannot be loaded safely. `reason` says what is wrong, without the file name."""

    def __init__(self, path: str | Path, what: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: unreadable {what}: {reason}")


def _header_problem(path: Path) -> str | None:
    """Why `path` is not a torch.save file, from its first bytes and zip directory (cheap), or None if it may be."""
    with open(path, "rb") as f:
        head = f.read(64)
    if zipfile.is_zipfile(path):  # torch >= 1.6 writes a zip archive; this also checks its end record (truncation)
        return None
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:  # a legacy torch file
        return None
    if not head:
        return f"{NOT_AN_ARCHIVE} (the file is empty)"
    return f"{NOT_AN_ARCHIVE} (neither the zip archive torch.save writes nor a legacy torch file; damaged or " \
           f"truncated?)"


def load_weights(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)` whose errors name the file and what is wrong with it.

    Raises FileNotFoundError for a missing file and :class:`WeightsFileError` (a ValueError) for a file that is
    damaged ("not a valid checkpoint archive") or holds pickled Python objects ("holds a Python object ... that
    is not plain weights"). PyTorch's own message is not passed on: it advises loading the file with code
    execution allowed, which fabdistill never does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        problem = _header_problem(path)
    except OSError as exc:
        raise WeightsFileError(path, what, f"cannot read the file ({exc.strerror or type(exc).__name__})") from None
    if problem:
        raise WeightsFileError(path, what, problem)
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns about legacy pickle protocols
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused something
        found = _GLOBAL.search(str(exc))
        if found:
            raise WeightsFileError(path, what, f"holds a Python object ({found.group(1)}) {NOT_WEIGHTS}") from None
        raise WeightsFileError(path, what, f"holds pickled data {NOT_WEIGHTS}") from None
    except Exception as exc:  # noqa: BLE001  RuntimeError (zip reader), EOFError, IndexError ...: damaged
        first = str(exc).strip().split(". ")[0]
        detail = first if first.startswith("PytorchStreamReader") else type(exc).__name__
        raise WeightsFileError(path, what, f"{NOT_AN_ARCHIVE} ({detail}; damaged or truncated?)") from None


def save_state(directory: str | Path, state: dict, meta: dict) -> None:
    """Write a checkpoint folder: `state.pt` holds only tensors/state dicts/numbers, `meta.json` describes it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load (state, meta) from a checkpoint folder, local or s3://, with `weights_only=True` (no code execution)."""
    directory = str(directory)
    if storage.is_s3(directory):
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_dir(directory, tmp)
            return load_state(tmp, map_location)
    path = Path(directory)
    state_path = path / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{path}: not a fabdistill checkpoint (no {STATE_FILE})")
    state = load_weights(state_path, map_location=map_location, what="checkpoint")
    meta = _read_meta(str(path / META_FILE)) if (path / META_FILE).exists() else {}
    return state, meta


def _read_meta(uri: str) -> dict:
    try:
        meta = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{uri}: unreadable checkpoint metadata: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):  # a file's content, not an argument: ValueError like the JSON error above
        raise ValueError(  # noqa: TRY004
            f"{uri}: unreadable checkpoint metadata: expected a JSON object, got {type(meta).__name__}")
    return meta


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint folder, or a run folder (its exported `model/`, else its newest checkpoint_*)."""
    def has_state(p: str) -> bool:
        return storage.exists(storage.join(p, STATE_FILE))

    if has_state(path):
        return path
    model = storage.join(path, "model")
    if has_state(model):
        return model
    if storage.exists(path):
        candidates = sorted(n for n in storage.listdir(path) if n.startswith("checkpoint_"))
        for name in reversed(candidates):
            if has_state(storage.join(path, name)):
                return storage.join(path, name)
    raise FileNotFoundError(f"{path}: no checkpoint found (expected {STATE_FILE}, a model/ folder or checkpoint_* folders)")


def check_checkpoint(path: str) -> str:
    """A cheap look at a checkpoint without loading its weights; returns the folder `resolve_checkpoint` picks.

    Checks that the folder resolves, that `state.pt` looks like a torch.save file (zip archive with its end record,
    or a legacy torch file) and that `meta.json`, if present, is a JSON object. On S3 only the objects' presence
    and meta.json are checked (state.pt is not downloaded). Raises FileNotFoundError / ValueError naming the path.
    Serve's build_app calls it so that a wrong path fails the application at once, before any replica starts.
    """
    resolved = resolve_checkpoint(path)
    state, meta = storage.join(resolved, STATE_FILE), storage.join(resolved, META_FILE)
    if not storage.is_s3(resolved):
        try:
            problem = _header_problem(Path(state))
        except OSError as exc:
            problem = f"cannot read the file ({exc.strerror or type(exc).__name__})"
        if problem:
            raise WeightsFileError(state, "checkpoint", problem)
    if storage.exists(meta):
        _read_meta(meta)
    return resolved
