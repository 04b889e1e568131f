"""Weights-only loading refuses damaged files and pickled Python objects with an error that names the file and
the problem, and never passes on PyTorch's advice to load the file with `weights_only=False`; through
fabdistill.checkpoints, the feature-extractor and Inception weight loaders, and the serve student path."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fabdistill.checkpoints import (
    NOT_AN_ARCHIVE,
    WeightsFileError,
    check_checkpoint,
    load_state,
    load_weights,
    save_state,
)

UNSAFE_ADVICE = "weights_only=False"


class Gadget:
    """A plain Python object: a weights-only loader must refuse to build it."""

    def __init__(self):
        self.value = 3


def run_payload(marker: str) -> None:
    """Stands in for the code an attacker's pickle runs: it leaves a marker file."""
    Path(marker).touch()


class Payload:
    """Unpickling this calls run_payload(marker) (the `__reduce__` trick)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (run_payload, (str(self.marker),))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _corrupt(tmp_path: Path) -> bytes:
    return b"this is not a torch checkpoint"


def _truncated(tmp_path: Path) -> bytes:
    data = _torch_bytes({"w": torch.ones(64)})
    return data[: len(data) // 2]


def _empty(tmp_path: Path) -> bytes:
    return b""


def _object(tmp_path: Path) -> bytes:
    return _torch_bytes({"w": torch.ones(2), "x": Gadget()})


def _reduce_payload(tmp_path: Path) -> bytes:
    return _torch_bytes({"w": torch.ones(2), "x": Payload(tmp_path / "pwned")})


def _raw_pickle_payload(tmp_path: Path) -> bytes:
    return pickle.dumps({"x": Payload(tmp_path / "pwned")})


# (case, bytes of state.pt, what the message must say)
CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("corrupt", _corrupt, NOT_AN_ARCHIVE),
    ("truncated", _truncated, NOT_AN_ARCHIVE),
    ("empty", _empty, NOT_AN_ARCHIVE),
    ("python-object", _object,
     f"holds a Python object ({__name__}.Gadget) that is not plain weights; fabdistill loads weights only"),
    ("reduce-payload", _reduce_payload, f"holds a Python object ({__name__}.run_payload) that is not plain weights"),
    ("raw-pickle-payload", _raw_pickle_payload, NOT_AN_ARCHIVE),
]


def _checkpoint(root: Path, make: Callable[[Path], bytes]) -> Path:
    """root/student/{state.pt, meta.json}, state.pt from `make(root)` (a payload's marker would land in root)."""
    folder = root / "student"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(make(root))
    (folder / "meta.json").write_text(json.dumps({"method": "ikddit", "role": "student"}))
    return folder


@pytest.mark.parametrize("make,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_state_refuses_naming_the_file_without_unsafe_advice(tmp_path, make, words):
    folder = _checkpoint(tmp_path, make)
    with pytest.raises(WeightsFileError) as caught:
        load_state(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'state.pt'}: unreadable checkpoint: ") and words in message, message
    assert UNSAFE_ADVICE not in message and "weights_only" not in message
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_plain_weights_load_and_legacy_files_still_work(tmp_path):
    save_state(tmp_path / "ok", {"w": torch.arange(3.0), "step": 4, "name": "x"}, {"step": 4})
    state, meta = load_state(tmp_path / "ok")
    assert torch.equal(state["w"], torch.arange(3.0)) and state["step"] == 4 and meta == {"step": 4}
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights(tmp_path / "legacy.pt")["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint file not found"):
        load_weights(tmp_path / "missing.pt")


def test_cheap_check_refuses_damaged_files_and_bad_metadata_without_loading(tmp_path):
    for name, make in (("corrupt", _corrupt), ("truncated", _truncated)):
        folder = _checkpoint(tmp_path / name, make)
        with pytest.raises(WeightsFileError, match=f"{folder / 'state.pt'}: unreadable checkpoint: {NOT_AN_ARCHIVE}"):
            check_checkpoint(str(folder))
    save_state(tmp_path / "good", {"w": torch.ones(1)}, {"step": 1})
    assert check_checkpoint(str(tmp_path / "good")) == str(tmp_path / "good")
    (tmp_path / "good" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"good/meta.json: unreadable checkpoint metadata: not valid JSON"):
        check_checkpoint(str(tmp_path / "good"))
    with pytest.raises(FileNotFoundError, match="nowhere: no checkpoint found"):
        check_checkpoint(str(tmp_path / "nowhere"))


def test_feature_extractor_and_inception_weights_refuse_objects(tmp_path):
    from metrics.fid import _check_inception_weights
    from models.feature_extractor import load_feature_net

    path = tmp_path / "fe.pt"
    path.write_bytes(_object(tmp_path))
    with pytest.raises(ValueError) as caught:
        load_feature_net(path)
    message = str(caught.value)
    assert f"{path}: unreadable feature-extractor weights: holds a Python object" in message
    assert "weights_only" not in message
    with pytest.raises(ValueError) as caught:
        _check_inception_weights(path)
    message = str(caught.value)
    assert f"{path}: not a readable weights-only state dict: holds a Python object" in message
    assert UNSAFE_ADVICE not in message


def test_serve_student_refuses_a_pickled_object_checkpoint(tmp_path):
    """The replica's loading path (StudentModel.load) and build_app's cheap check, on the IKDDiT student."""
    from serve.framework import CheckpointUnavailable, build_app
    from serve.schemas import StudentArgs
    from serve.students.ikddit import IKDDiTStudent

    folder = _checkpoint(tmp_path, _reduce_payload)
    with pytest.raises(RuntimeError) as caught:
        IKDDiTStudent(StudentArgs(checkpoint=str(folder), device="cpu"))
    message = str(caught.value)
    assert f"cannot load checkpoint '{folder}'" in message and "holds a Python object" in message
    assert "weights_only" not in message and not (tmp_path / "pwned").exists()

    corrupt = _checkpoint(tmp_path / "corrupt", _corrupt)
    with pytest.raises(CheckpointUnavailable) as caught:
        build_app({"students": {"ikddit": {"checkpoint": str(corrupt)}}})
    message = str(caught.value)
    assert message.startswith(f"student 'ikddit': cannot serve checkpoint '{corrupt}': ")
    assert f"{corrupt / 'state.pt'}: unreadable checkpoint: {NOT_AN_ARCHIVE}" in message
