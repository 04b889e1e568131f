"""Student networks (ShuffleNetV1, MobileNetV2) and the multi-scale wrapper: shapes, sizes, gradients, SDD regions."""

from __future__ import annotations

import pytest
import torch

from models.mobilenetv2 import MOBILENETV2_SIZES, build_mobilenetv2, mobilenetv2_from_meta
from models.multiscale import MultiScaleNet, check_scales, classifier_of, num_regions
from models.resnet_cifar import build_resnet
from models.shufflenet import SHUFFLENET_SIZES, build_shufflenet, shufflenet_from_meta

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name → (builder, params in millions at 100 classes / 3 channels, final map side at 32×32) as the module tables say
NETS = {
    "shufflev1": (build_shufflenet, 0.95, 4),
    "shufflev1_tiny": (build_shufflenet, 0.02, 4),
    "mobilenetv2": (build_mobilenetv2, 0.81, 2),
    "mobilenetv2_w1": (build_mobilenetv2, 2.35, 2),
    "mobilenetv2_tiny": (build_mobilenetv2, 0.04, 2),
}


def test_every_named_size_is_tested():
    assert set(NETS) == set(SHUFFLENET_SIZES) | set(MOBILENETV2_SIZES)


@pytest.mark.parametrize("arch", sorted(NETS))
def test_shapes_params_and_gradients(arch):
    build, params_m, side = NETS[arch]
    torch.manual_seed(0)
    net = build(arch, num_classes=100, in_channels=3)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params_m, abs=0.006)
    x = torch.randn(2, 3, 32, 32)
    logits, feat = net(x, return_features=True)
    assert logits.shape == (2, 100)
    assert feat.shape == (2, net.feature_channels, side, side)
    logits.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)
    assert net.fc.weight.grad.abs().sum() > 0 and next(net.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["shufflev1_tiny", "mobilenetv2_tiny"])
def test_wafer_maps_one_channel_52(arch):
    net = NETS[arch][0](arch, num_classes=38, in_channels=1).eval()
    logits, feat = net(torch.randn(3, 1, 52, 52), return_features=True)
    assert logits.shape == (3, 38) and feat.shape[2:] == ((7, 7) if arch.startswith("shuffle") else (4, 4))


def test_meta_round_trip_and_errors():
    for net, rebuild in ((build_shufflenet("shufflev1_tiny", 9, 1), shufflenet_from_meta),
                         (build_mobilenetv2("mobilenetv2_tiny", 9, 1), mobilenetv2_from_meta)):
        again = rebuild(net.meta())
        again.load_state_dict(net.state_dict())
        assert again.meta() == net.meta() == {"arch": net.arch, "num_classes": 9, "in_channels": 1}
        with pytest.raises(ValueError, match="expected input"):
            net(torch.randn(2, 3, 32, 32))
        with pytest.raises(ValueError, match="lacks"):
            rebuild({"arch": net.arch})
    with pytest.raises(ValueError, match="unknown ShuffleNet arch"):
        build_shufflenet("shufflev2")
    with pytest.raises(ValueError, match="unknown MobileNetV2 arch"):
        build_mobilenetv2("mobilenetv3")


# ----------------------------------------------------------------------------------------------- multi-scale wrapper


@pytest.mark.parametrize("arch", ["tiny", "shufflev1_tiny", "mobilenetv2_tiny"])
@pytest.mark.parametrize("scales", [[1], [1, 2], [1, 2, 4]])
def test_multiscale_shapes_and_global_region_is_the_plain_logits(arch, scales):
    torch.manual_seed(0)
    build = build_resnet if arch == "tiny" else NETS[arch][0]
    net = build(arch, 10, 1).eval()
    wrapped = MultiScaleNet(net, scales).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        plain = wrapped(x)
        logits, ms = wrapped(x, multi_scale=True)
        direct = net(x)
    assert torch.equal(plain, direct)  # a plain call is the wrapped network's own call
    assert ms.shape == (3, 10, num_regions(scales))
    assert torch.allclose(ms[:, :, 0], logits, atol=1e-5) and torch.allclose(logits, direct, atol=1e-6)


def test_multiscale_regions_match_pooled_features_and_share_the_classifier():
    torch.manual_seed(1)
    net = build_resnet("tiny", 5, 1).eval()
    wrapped = MultiScaleNet(net, [1, 2])
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        _, feat = net(x, return_features=True)  # (2, 32, 8, 8)
        _, ms = wrapped(x, multi_scale=True)
        top_left = net.fc(feat[:, :, :4, :4].mean((2, 3)))  # region 1 = top-left quadrant of the 2×2 grid
        bottom_right = net.fc(feat[:, :, 4:, 4:].mean((2, 3)))  # region 4
    assert torch.allclose(ms[:, :, 1], top_left, atol=1e-5)
    assert torch.allclose(ms[:, :, 4], bottom_right, atol=1e-5)
    assert classifier_of(net) is net.fc
    assert all(k.startswith("net.") for k in wrapped.state_dict())  # no duplicate classifier entry
    assert set(net.state_dict()) == {k[len("net."):] for k in wrapped.state_dict()}
    # gradients of the multi-scale logits reach the backbone and the shared classifier
    wrapped.train()
    _, ms = wrapped(x, multi_scale=True)
    ms.square().mean().backward()
    assert net.fc.weight.grad.abs().sum() > 0 and net.conv1.weight.grad.abs().sum() > 0


def test_check_scales_and_wrapper_errors():
    assert check_scales([1, 2, 4]) == (1, 2, 4) and num_regions([1, 2, 4]) == 21 and num_regions([1, 2]) == 5
    for bad in ([], [2, 4], [1, 1], [1, 4, 2], [1, 2.5]):
        with pytest.raises(ValueError, match="scales M"):
            check_scales(bad)
    with pytest.raises(TypeError, match="fc"):
        MultiScaleNet(torch.nn.Conv2d(1, 1, 1), [1])
