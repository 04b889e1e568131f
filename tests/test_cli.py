"""`fabdistill VERB ...`: one console script over every entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apps import cli
from fabdistill.methods import register, unregister
from trainers.launch import read_metrics

try:  # torch-fidelity installs a top-level `tests` package: ours is reached through pytest's rootdir path
    import toy_method
except ImportError:  # pragma: no cover
    from tests import toy_method

REPO = Path(__file__).resolve().parents[1]
VERBS = ("make-data", "train", "sample", "evaluate", "sweep", "serve", "demo")


def test_help_lists_every_verb_through_the_installed_script():
    script = Path(sys.executable).with_name("fabdistill")
    # the console script once `pip install -e .` has run since pyproject gained it; the module otherwise
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "apps.cli"]
    done = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for verb in VERBS:
        assert f"\n  {verb} " in done.stdout, verb
    assert set(cli.VERBS) == set(VERBS)


def test_make_data_then_train_through_the_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "overlay"
    cli.main(["make-data", "overlay", "--n", "8", "--size", "8", "--out", str(out)])
    from data.parquet_io import read_dataset

    assert read_dataset(str(out)).num_rows == 8

    register(toy_method.TOY)
    try:
        monkeypatch.delenv("FABDISTILL_VERBOSE", raising=False)
        cli.main(["--verbose", "train", "toy", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=c",
                  "--set", "run.num_workers=0", "--set", "trainer.steps=4"])
        assert os.environ["FABDISTILL_VERBOSE"] == "1"  # set before anything starts: Ray's processes see it
    finally:
        unregister("toy")
        os.environ.pop("FABDISTILL_VERBOSE", None)
    printed = capsys.readouterr().out
    assert f"run {tmp_path}/c, checkpoint {tmp_path}/c/model" in printed
    assert "[c] loss=" in printed  # verbose: the per-report lines too
    assert [m["step"] for m in read_metrics(str(tmp_path / "c"))] == [1, 2, 3, 4]


def test_each_verb_has_help_and_serve_fails_clearly_without_a_config(tmp_path, capsys):
    for verb in ("train", "serve"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([verb, "--help"])
        assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--set KEY=VALUE" in printed and "{run,check}" in printed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", str(tmp_path / "missing.yaml")])  # checked before any Ray starts
    assert exit_info.value.code == 1
    assert "missing.yaml: cannot read the Serve config" in capsys.readouterr().err
