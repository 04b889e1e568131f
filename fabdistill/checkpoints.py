"""Checkpoint folders, weights only: `state.pt` (tensors, state dicts, numbers; loaded with weights_only=True, so a
file cannot run code) and `meta.json` (what the state is: method, role, model config, step).

Used by training (trainers/launch.py writes them) and by inference (fabdistill/inference, serve/) alike.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from fabdistill import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"


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
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{state_path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    meta_path = path / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return state, meta


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
