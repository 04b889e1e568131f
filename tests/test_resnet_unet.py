"""models/resnet_cifar.py and models/unet.py: named sizes, parameter counts, shapes, features, errors."""

from __future__ import annotations

import pytest
import torch

from models.resnet_cifar import RESNET_ARCHS, build_resnet, count_params, resnet_from_meta
from models.unet import UNET_SIZES, build_unet, timestep_embedding, unet_from_meta


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch, millions", [("resnet8x4", 1.23), ("resnet32x4", 7.43), ("resnet18", 11.22),
                                            ("resnet34", 21.33), ("resnet8", 0.08), ("resnet56", 0.86)])
def test_resnet_parameter_counts_match_mdistiller(arch, millions):
    assert count_params(build_resnet(arch, 100, 3)) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("arch, channels, side", [("tiny", 32, 8), ("resnet8x4", 256, 8), ("resnet18_w16", 128, 4)])
def test_resnet_logits_and_final_feature_map(arch, channels, side):
    net = build_resnet(arch, 9, 1).eval()
    x = torch.randn(2, 1, 32, 32)
    logits, feat = net(x, return_features=True)
    assert logits.shape == (2, 9) and feat.shape == (2, channels, side, side)
    assert net.feature_channels == channels
    # the shared fc applied to the pooled feature map gives the logits (what SDD's per-region logits reuse)
    assert torch.allclose(net.fc(feat.mean(dim=(2, 3))), logits, atol=1e-5)
    assert torch.equal(net(x), logits)


def test_resnet_meta_round_trip_and_errors():
    net = build_resnet("tiny", 9, 1)
    again = resnet_from_meta(net.meta())
    again.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match="unknown ResNet arch"):
        build_resnet("resnet9000")
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="lacks"):
        resnet_from_meta({"arch": "tiny"})
    assert {"resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4", "resnet18",
            "resnet34", "tiny"} <= set(RESNET_ARCHS)


def test_unet_shapes_zero_init_and_gradients():
    net = build_unet("tiny", in_channels=1, image_size=32)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 500, 999])
    out = net(x, t)
    assert out.shape == x.shape
    assert out.abs().max() == 0  # zero-initialised output conv: a fresh model predicts ε̂ = 0
    out.sum().backward()
    assert net.conv_out.weight.grad is not None and net.conv_out.weight.grad.abs().sum() > 0


def test_unet_depends_on_timestep_and_attention_sizes():
    torch.manual_seed(0)
    net = build_unet("small", in_channels=3, image_size=32)
    with torch.no_grad():  # the zero-initialised layers would hide the timestep's effect
        for p in net.parameters():
            if p.ndim > 1 and p.abs().max() == 0:
                p.normal_(std=0.05)
    x = torch.randn(2, 3, 32, 32)
    a, b = net(x, torch.tensor([10, 10])), net(x, torch.tensor([900, 900]))
    assert not torch.allclose(a, b)
    assert sum(p.numel() for p in build_unet("ddpm", 3, 32).parameters()) / 1e6 == pytest.approx(35.75, abs=0.05)
    assert set(UNET_SIZES) >= {"tiny", "small", "base", "ddpm"}


def test_unet_meta_round_trip_and_errors():
    net = build_unet("tiny", 1, 16)
    again = unet_from_meta(net.meta())
    again.load_state_dict(net.state_dict())
    assert again.image_size == 16 and again.spec == net.spec
    with pytest.raises(ValueError, match="unknown UNet size"):
        build_unet("huge")
    with pytest.raises(ValueError, match="divisible"):
        build_unet("base", 1, 36)
    with pytest.raises(ValueError, match="t must have shape"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]))
    emb = timestep_embedding(torch.tensor([0, 1]), 8)
    assert emb.shape == (2, 8) and torch.allclose(emb[0, :4], torch.ones(4))  # cos(0) = 1


# --------------------------------------------------------------------------- the classifier and DDPM methods

def test_classifier_trains_in_process_and_method_evaluate_gives_a_top1_table(tmp_path):
    """trainers.classifier.train with run.num_workers=0 (the one training path), then METHOD.evaluate on its run
    folder and on a 3-channel checkpoint that the wafer maps cannot feed."""
    from fabdistill.config import load_config
    from fabdistill.methods import EvalTable, get_method
    from trainers import classifier
    from trainers.launch import read_metrics

    cfg = load_config(classifier.Config, "configs/classifier_wafer.yaml", [
        f"run.storage_path={tmp_path}", "run.name=clf", "run.num_workers=0", "data.n_train=128", "data.n_eval=32",
        "data.size=16", "optim.epochs=2", "optim.batch_size=32", "optim.warmup_steps=2", "model.arch=tiny"])
    outcome = classifier.train(cfg)
    rows = read_metrics(outcome.run_dir)
    assert [r["step"] for r in rows] == [4, 8] and all(0 <= r["heldout_top1"] <= 1 for r in rows)
    assert outcome.checkpoint_dir.endswith("model") and outcome.metrics["epoch"] == 1

    method = get_method("classifier")
    settings = method.EvalSettings(n=40, size=16)
    table = method.get("evaluate")({"model": outcome.run_dir}, settings, str(tmp_path / "eval"))
    assert isinstance(table, EvalTable) and "top-1" in table.markdown()
    row = table.row("model")
    assert 0.0 <= row["top1"] <= 1.0 and row["images_per_s"] > 0 and row["arch"] == "tiny"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert report.startswith("# Classifier evaluation") and "**Held-out top-1 (40 generated wafer maps" in report
    assert table.markdown().split("\n", 1)[1].strip() in report  # the same table, then its figures
    # the same number as the trainer's own held-out evaluation, when the settings match the run's held-out set
    again = method.get("evaluate")({"model": outcome.run_dir}, method.EvalSettings(n=32, size=16), None)
    assert again.row("model")["top1"] == pytest.approx(rows[-1]["heldout_top1"])
    # the sweep space scores a trial on the same held-out set (N from the sweep's score settings)
    from tune.spaces import ScoreSettings, get_space

    space = get_space("classifier")
    assert space.score_mode == "max" and space.early_stop_metric in rows[-1]
    scored = space.score(outcome, cfg, ScoreSettings(n=32, batch_size=64))
    assert scored["heldout_top1"] == pytest.approx(rows[-1]["heldout_top1"]) and scored["images_per_s"] > 0

    rgb = build_resnet("tiny", 9, 3)
    classifier.save_classifier(str(tmp_path / "rgb"), rgb, "image_pm1")
    with pytest.raises(ValueError, match="takes 3-channel inputs"):
        method.get("evaluate")({"model": str(tmp_path / "rgb")}, settings, None)


def test_ddpm_samples_to_parquet_and_png(tmp_path):
    from data.parquet_io import read_dataset
    from fabdistill.methods import get_method
    from models.diffusion import GaussianDiffusion
    from trainers.ddpm import save_ddpm

    torch.manual_seed(0)
    save_ddpm(str(tmp_path / "ddpm"), build_unet("tiny", 1, 8).eval(), GaussianDiffusion(20, "linear"))
    method = get_method("ddpm")
    message = method.get("sample")(str(tmp_path / "ddpm"), str(tmp_path / "out"), method.SampleSettings(n=5, steps=2))
    table = read_dataset(str(tmp_path / "out" / "samples"))
    assert table.num_rows == 5 and set(table["label"].to_pylist()) == {-1} and "5 wafer samples" in message
    assert (tmp_path / "out" / "samples.png").read_bytes()[:4] == b"\x89PNG"
