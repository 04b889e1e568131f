"""FID/KID through torch-fidelity (domain extractor and Inception path) and overlay model-fit statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.datasets import table_to_tensors
from data.overlay import LINEAR_TERMS, generate_overlay, grid_coordinates, linear_overlay
from metrics import fid as fid_mod
from metrics.fid import compute_fid_kid, load_domain_classifier, to_uint8_rgb
from metrics.overlay import (compare_overlay_stats, conditional_fidelity, mean_plus_3sigma, overlay_stats,
                             wasserstein1)


@pytest.fixture(scope="module")
def overlay_maps():
    t = table_to_tensors(generate_overlay(128, seed=7), "overlay")
    x, y = t["overlay"], t["equipment_id"]
    return x, y


def _shift(x: torch.Tensor, nm: float) -> torch.Tensor:
    valid = torch.from_numpy(grid_coordinates(x.shape[2], x.shape[3])["valid"]).float()
    return x + nm * valid  # translate dx and dy on the wafer only


# --------------------------------------------------------------------------- FID / KID, domain extractor

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_translation(overlay_maps):
    x, _ = overlay_maps
    kw = dict(domain="overlay", kid_subset_size=64, kid_subsets=50, batch_size=128)
    same = compute_fid_kid(x, x.clone(), **kw)
    assert same["feature_extractor"] == "fabdistill-overlay" and same["weights"].endswith("overlay_fe.pt")
    assert abs(same["fid"]) < 1e-6
    fids, kids = [], []
    for nm in (2.0, 5.0, 10.0):
        r = compute_fid_kid(x, _shift(x, nm), **kw)
        fids.append(r["fid"])
        kids.append(r["kid_mean"])
    assert 1e-3 < fids[0] < fids[1] < fids[2], fids
    assert same["kid_mean"] < kids[0] < kids[1] < kids[2], kids
    # KID of a set with itself is ~0: subsets overlap, which biases the unbiased estimator slightly negative
    assert abs(same["kid_mean"]) < 0.2 * kids[2]


def test_fid_grows_with_scaling_and_input_validation(overlay_maps):
    x, _ = overlay_maps
    x = x[:72]
    kw = dict(domain="overlay", kid_subset_size=32, kid_subsets=20)
    small = compute_fid_kid(x, x * 1.2, **kw)["fid"]
    large = compute_fid_kid(x, x * 2.0, **kw)["fid"]
    assert 0 < small < large
    with pytest.raises(ValueError, match="has 2 channel"):
        compute_fid_kid(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="kid_subset_size=100"):
        compute_fid_kid(x, x, kid_subset_size=100)
    with pytest.raises(ValueError, match="NaN"):
        compute_fid_kid(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="unknown domain"):
        compute_fid_kid(x, x, domain="cifar")


def test_missing_or_corrupt_domain_weights_give_clear_errors(tmp_path, monkeypatch, overlay_maps):
    x, _ = overlay_maps
    with pytest.raises(FileNotFoundError, match="not found"):
        compute_fid_kid(x[:8], x[:8], domain_weights_path=tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"definitely not torch")
    with pytest.raises(ValueError, match="unreadable"):
        compute_fid_kid(x[:8], x[:8], domain_weights_path=tmp_path / "bad.pt")
    monkeypatch.setattr(fid_mod, "WEIGHTS_DIR", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="python -m trainers.feature_extractor --domain overlay --export"):
        compute_fid_kid(x[:8], x[:8])


def test_custom_domain_weights_are_used(tmp_path, overlay_maps):
    from models.feature_extractor import build_feature_net, save_feature_net

    torch.manual_seed(1)
    net = build_feature_net("S", 2, 16)
    path = tmp_path / "custom.pt"
    save_feature_net(path, net, "overlay", [str(i) for i in range(16)])
    x, _ = overlay_maps
    r = compute_fid_kid(x[:40], _shift(x[:40], 5.0), domain_weights_path=path, kid_subset_size=20, kid_subsets=10)
    assert r["weights"] == str(path) and math.isfinite(r["fid"]) and r["fid"] > 0


# --------------------------------------------------------------------------- Inception path

def _random_inception_weights(path) -> None:
    """A state dict in torch-fidelity's InceptionV3 layout, randomly initialised (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fei

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fei, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fei.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fei.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_inception_is_used_when_a_weights_path_is_given(tmp_path, monkeypatch, overlay_maps):
    import torch_fidelity.feature_extractor_inceptionv3 as fei

    path = tmp_path / "inception.pth"
    _random_inception_weights(path)
    seen = []
    original = fei.FeatureExtractorInceptionV3.forward

    def spy(self, x):
        seen.append((x.dtype, tuple(x.shape)))
        return original(self, x)

    monkeypatch.setattr(fei.FeatureExtractorInceptionV3, "forward", spy)
    x, _ = overlay_maps
    r = compute_fid_kid(x[:3], _shift(x[3:6], 10.0), feature_extractor_weights_path=path, kid_subset_size=2,
                        kid_subsets=5)
    assert r["feature_extractor"] == "inception-v3-compat"
    assert seen and all(dtype == torch.uint8 and shape[1:] == (3, 32, 32) for dtype, shape in seen)
    assert math.isfinite(r["fid"]) and math.isfinite(r["kid_mean"])

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a torch-fidelity InceptionV3 state dict"):
        compute_fid_kid(x[:3], x[:3], feature_extractor_weights_path=tmp_path / "wrong.pth", kid_subset_size=2)
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable weights-only state dict"):
        compute_fid_kid(x[:3], x[:3], feature_extractor_weights_path=tmp_path / "corrupt.pth", kid_subset_size=2)
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        compute_fid_kid(x[:3], x[:3], feature_extractor_weights_path=tmp_path / "none.pth", kid_subset_size=2)


def test_uint8_encoding_for_inception():
    x = torch.zeros(1, 2, 1, 3)
    x[0, 0, 0] = torch.tensor([-64.0, 0.0, 64.0])       # dx
    x[0, 1, 0] = torch.tensor([0.0, 100.0, 64.0])       # dy (100 clips to 64)
    img = to_uint8_rgb(x, "overlay")
    assert img.dtype == torch.uint8 and img.shape == (1, 3, 1, 3)
    assert img[0, 0, 0].tolist() == [0, 128, 255]
    assert img[0, 1, 0].tolist() == [128, 255, 255]
    assert img[0, 2, 0].tolist() == [180, 255, 255]     # |d| / (64 √2) · 255: 64 nm → 180, ≥ 90.5 nm → 255
    wafer = to_uint8_rgb(torch.tensor([[[[0.0, 1.0, 2.0]]]]), "wafer")
    assert wafer.shape == (1, 3, 1, 3) and wafer[0, :, 0].tolist() == [[0, 128, 255]] * 3


# --------------------------------------------------------------------------- overlay statistics

def test_mean_plus_3sigma_by_hand():
    v = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]])
    expected = 2.5 + 3 * math.sqrt(5 / 3)  # |mean| + 3 · sample std (ddof 1) = 2.5 + 3 · 1.29099
    np.testing.assert_allclose(mean_plus_3sigma(v), [expected, expected])
    valid = np.array([True, True, False, False])
    np.testing.assert_allclose(mean_plus_3sigma(v, valid), [1.5 + 3 * math.sqrt(0.5)] * 2)
    with pytest.raises(ValueError, match="at least 2"):
        mean_plus_3sigma(v, np.array([True, False, False, False]))


def test_map_built_from_known_terms_gives_them_back():
    coords = grid_coordinates(32, 32)
    terms = np.array([[3.0, -2.0, 0.05, -0.04, 0.03, 0.02, 0.5, -0.3, 0.2, -0.4],
                      [-1.0, 4.0, -0.02, 0.01, -0.05, 0.04, -0.6, 0.7, -0.1, 0.3]])
    maps = linear_overlay(terms, coords)                     # (2, 2, 32, 32)
    stats = overlay_stats(maps, coords)
    np.testing.assert_allclose(stats["terms"], terms, rtol=1e-4, atol=1e-4)
    assert stats["term_names"] == list(LINEAR_TERMS)
    for axis in ("x", "y"):
        assert np.all(stats["residual_m3s"][axis] < 1e-3)   # the linear model explains everything
    np.testing.assert_allclose(stats["term_mean"]["tx"], 1.0, atol=1e-4)
    np.testing.assert_allclose(stats["term_std"]["ty"], np.std([-2.0, 4.0], ddof=1), atol=1e-4)

    # raw |mean|+3σ of a pure translation is the translation; a residual bump shows up only in the residual
    flat = linear_overlay(np.array([5.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), coords)[None].astype(np.float64)
    bump = flat.copy()
    bump[0, 1, 16, 16] += 10.0
    s = overlay_stats(np.concatenate([flat, bump]), coords)
    np.testing.assert_allclose(s["raw_m3s"]["x"], [5.0, 5.0], atol=1e-4)
    assert s["residual_m3s"]["x"][0] < 1e-3 and s["residual_m3s"]["y"][1] > 0.5
    valid = coords["valid"].reshape(-1)
    hand = mean_plus_3sigma(bump[0, 1].reshape(-1)[valid])
    np.testing.assert_allclose(s["raw_m3s"]["y"][1], hand)


def test_wasserstein_and_comparison():
    assert wasserstein1(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == pytest.approx(2.0)
    assert wasserstein1(np.array([0.0]), np.array([0.0, 2.0])) == pytest.approx(1.0)
    coords = grid_coordinates(16, 16)
    rng = np.random.default_rng(0)
    terms = rng.normal(0.0, 1.0, size=(64, 10)) * np.array([3, 3, .05, .05, .05, .05, .5, .5, .5, .5])
    real = linear_overlay(terms, coords)
    same = compare_overlay_stats(real, real, coords)
    assert same["mean_w1_norm"] == pytest.approx(0.0, abs=1e-6)
    shifted = terms.copy()
    shifted[:, 0] += terms[:, 0].std(ddof=1)                   # tx off by one real standard deviation
    cmp = compare_overlay_stats(real, linear_overlay(shifted, coords), coords)
    assert cmp["terms"]["tx"]["w1_norm"] == pytest.approx(1.0, rel=1e-3)
    assert cmp["terms"]["ty"]["w1_norm"] < 1e-3
    assert cmp["terms"]["tx"]["gen_mean"] - cmp["terms"]["tx"]["real_mean"] > 0
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        overlay_stats(np.zeros((4, 3, 16, 16)))


def test_conditional_fidelity(overlay_maps):
    x, y = overlay_maps
    classifier = load_domain_classifier("overlay")
    acc = conditional_fidelity(x, y, classifier)
    assert acc >= 0.8                                         # real maps carry their equipment's fingerprint
    wrong = (y + 1) % 16
    assert conditional_fidelity(x, wrong, classifier) < 0.2
    assert conditional_fidelity(x, y, classifier.net) == acc  # a bare net gets the overlay encoding
    with pytest.raises(ValueError, match="equipment labels"):
        conditional_fidelity(x, y[:5], classifier)

    def by_sign(m: torch.Tensor) -> torch.Tensor:             # a hand-made 2-class classifier
        s = (m[:, 0].mean(dim=(1, 2)) > 0).long()
        return torch.nn.functional.one_hot(s, 2).float()

    maps = torch.zeros(4, 2, 8, 8)
    maps[:2, 0] = 1.0
    maps[2:, 0] = -1.0
    assert conditional_fidelity(maps, [1, 0, 0, 0], by_sign) == 0.75
