"""Shared helpers for benchmark scripts: machine description and result tables (JSON + Markdown)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**payload, "machine": machine()}, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")
