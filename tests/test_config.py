import dataclasses
from pathlib import Path

import pytest

from fabdistill.config import ConfigError, describe, knob, load_config, parse_override, section, to_dict


@dataclasses.dataclass
class Inner:
    mask_ratio: float = knob(0.5, ge=0.0, lt=1.0, help="fraction of patch tokens hidden from the student")
    depth: int = knob(2, ge=1, le=64)
    sampler: str = knob("ddim", choices=("ddpm", "ddim"))
    scales: list[int] = knob([1, 2, 4], ge=1)


@dataclasses.dataclass
class Outer:
    name: str = knob("x")
    trainer: Inner = section(Inner)
    flag: bool = knob(False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "trainer:\n  mask_ratio: 0.25\n  depth: 4\n"))
    assert cfg.trainer.mask_ratio == 0.25 and cfg.trainer.depth == 4 and cfg.trainer.sampler == "ddim"
    assert load_config(Outer).trainer.scales == [1, 2, 4]


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(Outer, write(tmp_path, "trainer: {mask_ratio: 0}\n")).trainer.mask_ratio == 0.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "trainer:\n  mask_ration: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    assert "trainer.mask_ration" in str(err.value) and str(path) in str(err.value)


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "trainr: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainr'"):
        load_config(Outer, path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "trainer:\n  depth: four\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    assert "trainer.depth" in str(err.value) and "integer" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="flag"):
        load_config(Outer, write(tmp_path, "flag: 1\n"))


def test_out_of_range_names_key_and_range(tmp_path):
    path = write(tmp_path, "trainer:\n  mask_ratio: 1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    msg = str(err.value)
    assert "trainer.mask_ratio" in msg and "< 1.0" in msg and str(path) in msg
    with pytest.raises(ConfigError, match=r"trainer.scales"):
        load_config(Outer, write(tmp_path, "trainer: {scales: [1, 0]}\n"))
    with pytest.raises(ConfigError, match=r"trainer.sampler.*one of"):
        load_config(Outer, write(tmp_path, "trainer: {sampler: euler}\n"))


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "trainer: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))


def test_overrides(tmp_path):
    cfg = load_config(Outer, write(tmp_path, "trainer: {depth: 3}\n"),
                      overrides=["trainer.mask_ratio=0.7", "trainer.scales=[1,2]", "flag=true", "name=run-a"])
    assert cfg.trainer.mask_ratio == 0.7 and cfg.trainer.scales == [1, 2] and cfg.flag and cfg.name == "run-a"
    assert cfg.trainer.depth == 3
    assert parse_override("trainer.lr=3e-4") == (["trainer", "lr"], 3e-4)
    with pytest.raises(ConfigError, match="unknown key 'trainer.nope'"):
        load_config(Outer, overrides=["trainer.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(Outer, overrides=["trainer.depth"])


def test_round_trip_and_describe(tmp_path):
    import yaml

    cfg = load_config(Outer, overrides=["trainer.depth=7"])
    path = write(tmp_path, yaml.safe_dump(to_dict(cfg)))
    assert load_config(Outer, path) == cfg
    lines = describe(Outer)
    assert any(line.startswith("trainer.mask_ratio: float = 0.5 (>= 0.0 and < 1.0)") for line in lines)
