"""KDCDDM end to end, in-process on tiny sizes: every phase trains, thresholds come from the validation split,
apps.evaluate / apps.sample run through the method interface, resume works, the wafer domain runs through the same
commands, and the pipeline's pieces (wafer twins, smoothing, config errors, Tune knobs) behave."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fabdistill.config import ConfigError, from_dict
from fabdistill.inference.kdcddm import (MODELS, SEM_HELD_OUT, Segmenter, gaussian_smooth, held_out_pairs,
                                         pairs_from_tensors)
from trainers.kdcddm.config import Config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PHASE = {"steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 2}


def tiny(name: str, storage: str, domain: str = "sem", **top) -> dict:
    return {"data": {"num_train": 12, "num_validation": 8, "domain": domain},
            "vae": {**PHASE, "base_channels": 8, "downsample": 4}, "icddm": {**PHASE, "size": "tiny", "base_channels": 8},
            "icddm_unpaired": {**PHASE, "size": "tiny", "base_channels": 8},
            "cdldm": {**PHASE, "size": "tiny"}, "student": {**PHASE, "teacher_steps": 2},
            "baselines": {**PHASE, "unet_size": "tiny", "base_channels": 8},
            "inference": {"steps": 2, "unpaired_steps": 2, "cond_t_start": 500},
            "run": {"name": name, "storage_path": storage, "num_workers": 0}, **top}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from trainers.kdcddm.driver import train

    storage = str(tmp_path_factory.mktemp("kdcddm"))
    outcome = train(from_dict(Config, tiny("t", storage)))
    return outcome, storage


def test_every_phase_trains_and_is_calibrated_on_validation(trained):
    outcome, _ = trained
    assert list(outcome.phases) == ["vae", "icddm", "icddm_unpaired", "cdldm", "student", "baselines"]
    assert outcome.checkpoint_dir == outcome.phases["baselines"].checkpoint_dir
    seen = set()
    for phase, out in outcome.phases.items():
        meta = json.loads(open(f"{out.checkpoint_dir}/meta.json").read())
        assert meta["method"] == "kdcddm" and meta["step"] == 3 and meta["phase"] == phase
        for model in meta["models"]:
            if model != "vae":
                assert 0.0 <= meta["thresholds"][model] <= 1.0, (model, meta["thresholds"])
                seen.add(model)
    assert seen == set(MODELS)
    vae = json.loads(open(f"{outcome.phases['vae'].checkpoint_dir}/meta.json").read())
    state = torch.load(f"{outcome.phases['vae'].checkpoint_dir}/state.pt", weights_only=True)
    scale = float(state["models"]["vae"]["vae"]["latent_scale"])
    assert scale > 0 and scale != 1.0  # set from the training latents' std
    assert vae["diffusion"] == {"num_timesteps": 1000, "schedule": "cosine"}


def test_pipelines_translate_segment_and_are_seeded(trained):
    outcome, _ = trained
    x = held_out_pairs("sem", 3, 32, "test")["defect"]
    for phase in ("icddm", "icddm_unpaired", "cdldm", "student"):
        seg = Segmenter.from_checkpoint(outcome.phases[phase].checkpoint_dir)
        a, b = seg.translate(x, seed=1), seg.translate(x, seed=1)
        assert a.shape == x.shape and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
        out = seg.segment(x, seed=1)
        assert out["mask"].shape == out["score"].shape == (3, 32, 32) and out["mask"].dtype == torch.bool
        assert torch.equal(out["mask"], out["score"] >= seg.threshold)
    with pytest.raises(ValueError, match="holds models"):
        Segmenter.from_checkpoint(outcome.phases["baselines"].checkpoint_dir)
    sup = Segmenter.from_checkpoint(outcome.phases["baselines"].checkpoint_dir, "supervised")
    assert "translation" not in sup.segment(x) and not sup.translates
    with pytest.raises(ValueError, match=r"expected images \(N, 1, 32, 32\)"):
        sup.segment(torch.zeros(1, 3, 32, 32))
    student = Segmenter.from_checkpoint(outcome.phases["student"].checkpoint_dir)
    d, c = student.augment(x, sigma=0.3, seed=0)
    assert d.shape == c.shape == x.shape and not torch.equal(d, student.augment(x, sigma=0.3, seed=1)[0])
    d, c = student.generate_pairs(2, seed=0, steps=2)
    assert d.shape == c.shape == (2, 1, 32, 32)


def test_apps_evaluate_and_sample_through_the_method(trained, tmp_path, capsys):
    from apps.evaluate import main as evaluate_main
    from apps.sample import main as sample_main

    _, storage = trained
    out = tmp_path / "eval"
    evaluate_main(["kdcddm", "--checkpoint", f"run={storage}/t", "--n", "8", "--set", "n_validation=8",
                   "--set", "batch_size=4", "--out", str(out)])
    table = json.loads((out / "table.json").read_text())
    assert [r["model"] for r in table["rows"]] == list(MODELS) + ["real_twin", "random"]  # + the model-free rows
    for r in table["rows"]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("auroc", "ap", "pro", "iou", "dice"))
        assert r["images_per_s"] > 0 if r["model"] in MODELS else r["images_per_s"] is None
    assert (out / "examples.png").stat().st_size > 0 and "pixel AUROC" in capsys.readouterr().out
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(str(out / "report.md"))
    assert [p.rsplit("/", 1)[-1] for p in pictures] == ["examples.png", "translations.png", "score_maps.png",
                                                         "training_curves.png"]
    assert all(os.path.getsize(p) > 0 for p in pictures)
    for mode, ckpt in (("segment", "t-student"), ("augment", "t-cdldm"), ("pairs", "t-student")):
        dest = tmp_path / mode
        sample_main(["kdcddm", "--checkpoint", f"{storage}/{ckpt}", "--out", str(dest), "--n", "3", "--steps", "2",
                     "--set", f"mode={mode}"])
        import pyarrow.parquet as pq

        rows = pq.read_table(dest / "samples.parquet")
        assert rows.num_rows == 3 and (dest / "grid.png").stat().st_size > 0
        assert (dest / "scores.png").is_file() == (mode == "segment")
        if mode == "segment":
            assert {"input", "translation", "score", "predicted_mask", "true_mask"} <= set(rows.column_names)


def test_rerun_resumes_each_phase(tmp_path):
    from trainers.kdcddm.driver import train
    from trainers.launch import read_metrics

    cfg = tiny("r", str(tmp_path), phases="vae,baselines")
    train(from_dict(Config, cfg))
    cfg["vae"] = {**cfg["vae"], "steps": 5}
    cfg["baselines"] = {**cfg["baselines"], "steps": 5}
    outcome = train(from_dict(Config, cfg))
    for phase in ("vae", "baselines"):
        rows = read_metrics(outcome.phases[phase].run_dir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r["resumed_from"] for r in rows][-2:] == [3, 3]


def test_wafer_domain_runs_through_the_same_commands(tmp_path, capsys):
    from apps.evaluate import main as evaluate_main
    from apps.sample import main as sample_main
    from apps.train import main as train_main

    sets = ["data.num_train=12", "data.num_validation=8", "run.num_workers=0", f"run.storage_path={tmp_path}",
            "run.name=w", "inference.steps=2", "student.teacher_steps=2", "student.max_targets=0"]
    for phase in ("vae", "icddm", "icddm_unpaired", "cdldm", "student", "baselines"):
        sets += [f"{phase}.steps=2", f"{phase}.batch_size=4", f"{phase}.checkpoint_every=2"]
    train_main(["kdcddm", "--config", "configs/kdcddm_wafer_tiny.yaml"] + [a for s in sets for a in ("--set", s)])
    evaluate_main(["kdcddm", "--checkpoint", f"run={tmp_path}/w", "--n", "8", "--set", "n_validation=8",
                   "--out", str(tmp_path / "eval")])
    table = json.loads((tmp_path / "eval" / "table.json").read_text())
    assert table["extras"]["domain"] == "wafer" and len(table["rows"]) == len(MODELS) + 2
    sample_main(["kdcddm", "--checkpoint", f"{tmp_path}/w-student", "--out", str(tmp_path / "s"), "--n", "2"])
    assert (tmp_path / "s" / "grid.png").exists()


@pytest.mark.parametrize("domain", ["sem", "wafer"])
def test_reference_rows_bracket_the_models_real_twin_ceiling_and_random_floor(domain):
    from fabdistill.inference.kdcddm import held_out_pairs
    from trainers.kdcddm.evaluate import reference_rows

    test, val = held_out_pairs(domain, 32, 32, "test"), held_out_pairs(domain, 16, 32, "validation")
    rows = {r["model"]: r for r in reference_rows(test, val, 1.0)}
    # the synthetic twins differ from the inputs exactly on the mask: only the smoothing blurs the ceiling
    assert rows["real_twin"]["auroc"] > 0.95 and rows["real_twin"]["iou"] > 0.6
    assert 0.4 < rows["random"]["auroc"] < 0.6 and rows["random"]["iou"] < rows["real_twin"]["iou"] / 3
    sharp = {r["model"]: r for r in reference_rows(test, val, 0.0)}
    assert sharp["real_twin"]["iou"] == pytest.approx(1.0, abs=0.005) and sharp["real_twin"]["auroc"] > 0.995


def test_wafer_clean_twin_and_mask_from_the_pattern():
    wafer_map = torch.tensor([[[[0, 1, 2], [2, 2, 1], [1, 2, 0]]]], dtype=torch.float32)
    pattern = torch.tensor([[[[0, 0, 1], [1, 0, 0], [0, 1, 0]]]], dtype=torch.float32)  # pattern fails
    pairs = pairs_from_tensors({"wafer_map": wafer_map, "pattern_mask": pattern}, "wafer")
    assert torch.equal(pairs["defect"] * 2, wafer_map)
    # pattern fails set to pass (1); the background fail at (1, 1) stays
    assert torch.equal(pairs["clean"] * 2, torch.tensor([[[[0, 1, 1], [1, 2, 1], [1, 1, 0]]]], dtype=torch.float32))
    assert torch.equal(pairs["mask"].bool(), pairs["defect"] != pairs["clean"])
    real = held_out_pairs("wafer", 4, 32, "validation")
    assert torch.equal(real["mask"].bool(), real["defect"] != real["clean"])


def test_gaussian_smoothing_keeps_constants_and_mass():
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(gaussian_smooth(flat, 1.5), flat)
    spike = torch.zeros(1, 1, 15, 15)
    spike[0, 0, 7, 7] = 1.0
    out = gaussian_smooth(spike, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5) and out.max() < 0.2 and out[0, 0, 7, 7] == out.max()
    assert torch.equal(gaussian_smooth(spike, 0.0), spike)


@pytest.mark.parametrize("change, message", [
    ({"phases": "vae,decoder"}, "unknown"),
    ({"phases": "student"}, "needs the CDLDM teacher"),
    ({"phases": "cdldm"}, "needs the VAE"),
    ({"data": {"seed": SEM_HELD_OUT}}, "held-out"),
    ({"inference": {"t0": 999}, "diffusion": {"num_timesteps": 500}}, "must be < diffusion.num_timesteps"),
    ({"vae": {"subpixel": True, "downsample": 1}}, "vae.subpixel needs vae.downsample >= 2"),
])
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Config, change)


def test_tune_space_knobs_are_config_paths():
    from trainers.kdcddm.tune import SPACE

    for alias in SPACE.knobs:
        SPACE.path_of(alias)  # raises ConfigError naming the alias if a path is not a knob
    assert {"t0", "lambda_l1", "latent_channels", "threshold"} <= set(SPACE.knobs)
