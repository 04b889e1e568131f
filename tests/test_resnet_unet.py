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
