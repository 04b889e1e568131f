"""Logit-distillation losses (trainers/distillers.py) against hand-computed cases.

Worked numbers used below (ln = natural log):
  KD2:  p_t = [3/4, 1/4], p_s = [1/2, 1/2]:  KL = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.304099 − 0.173287 = 0.130812
  DKD3: target 0, p_t = [0.6, 0.3, 0.1] (logits ln 6, ln 3, 0), p_s = [1/3, 1/3, 1/3] (logits 0):
        TCKD = KL([0.6, 0.4] ‖ [1/3, 2/3]) = 0.6·ln 1.8 + 0.4·ln 0.6 = 0.352672 − 0.204330 = 0.148342
        NCKD = KL([3/4, 1/4] ‖ [1/2, 1/2]) = 0.130812 (= KD2)
        KD   = 0.6·ln 1.8 + 0.3·ln 0.9 + 0.1·ln 0.3 = 0.200667 = TCKD + (1 − 0.6)·NCKD (DKD's identity)
  LS3:  Z([1, 2, 3]) = [−1, 0, 1] (mean 2, unbiased std 1); softmax = [0.090031, 0.244728, 0.665241];
        vs uniform: KD = 0.266217; target 2: TCKD = 0.229077, NCKD = ln 2 − H([σ(−1), σ(1)]) = 0.110944
"""

from __future__ import annotations

import math

import pytest
import torch

from trainers.distillers import (DISTILLERS, DistillSettings, dkd_loss, dkd_warmup_weight, get_distiller, kd_loss,
                                 multi_scale_logits, region_pool, sdd_dkd_loss, sdd_kd_loss, sdd_lskd_loss,
                                 sdd_region_weights, standardize_logits, total_loss)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KD2 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
TCKD3 = 0.6 * math.log(1.8) + 0.4 * math.log(0.6)  # 0.148342
LN = math.log


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------- KD


def test_kd_hand_computed_and_temperature_squared():
    s = t([0.0, 0.0])
    assert kd_loss(s, t([LN(3), 0.0]), 1.0).item() == pytest.approx(KD2, abs=1e-6)
    # T = 2 with doubled teacher logits: the same softened distributions, and the loss picks up T² = 4
    assert kd_loss(s, t([2 * LN(3), 0.0]), 2.0).item() == pytest.approx(4 * KD2, abs=1e-6)
    # batch mean over rows: [KD2, 0]
    batch = kd_loss(t([0.0, 0.0], [1.0, 2.0]), t([LN(3), 0.0], [1.0, 2.0]), 1.0)
    assert batch.item() == pytest.approx(KD2 / 2, abs=1e-6)
    per = kd_loss(t([0.0, 0.0], [1.0, 2.0]), t([LN(3), 0.0], [1.0, 2.0]), 1.0, reduction="none")
    assert per.shape == (2,) and per[1].item() == pytest.approx(0.0, abs=1e-12)


def test_kd_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 4.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, reduction="sum")


# --------------------------------------------------------------------------------------------------------- DKD


def test_dkd_each_term_hand_computed():
    s, te, y = t([0.0, 0.0, 0.0]), t([LN(6), LN(3), 0.0]), torch.tensor([0])
    out = dkd_loss(s, te, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert out["tckd"].item() == pytest.approx(TCKD3, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(KD2, abs=1e-6)
    assert out["loss"].item() == pytest.approx(TCKD3 + 8 * KD2, abs=1e-6)  # 1.194838
    # DKD's identity KD = TCKD + (1 − p_t)·NCKD with p_t = 0.6
    assert kd_loss(s, te, 1.0).item() == pytest.approx(TCKD3 + 0.4 * KD2, abs=1e-6)
    # T = 2 on doubled logits: each term × 4
    out2 = dkd_loss(s, 2 * te, y, alpha=2.0, beta=0.5, temperature=2.0)
    assert out2["tckd"].item() == pytest.approx(4 * TCKD3, abs=1e-6)
    assert out2["nckd"].item() == pytest.approx(4 * KD2, abs=1e-6)
    assert out2["loss"].item() == pytest.approx(4 * (2 * TCKD3 + 0.5 * KD2), abs=1e-6)


def test_dkd_of_a_model_with_itself_is_zero_and_large_logits_are_finite():
    torch.manual_seed(0)
    z, y = torch.randn(8, 10) * 5, torch.randint(0, 10, (8,))
    out = dkd_loss(z, z.clone(), y, 1.0, 8.0, 4.0)
    for k in ("tckd", "nckd", "loss"):
        assert out[k].abs().item() < 1e-6
    big = dkd_loss(z * 1e3, torch.randn(8, 10) * 1e3, y, 1.0, 8.0, 1.0)  # no 0·log 0 NaNs at extreme logits
    assert all(torch.isfinite(v) for v in big.values())


def test_dkd_gradients_reach_the_student_only_through_the_loss():
    s = torch.randn(4, 5, requires_grad=True)
    out = dkd_loss(s, torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), 1.0, 8.0, 4.0)
    out["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_dkd_errors():
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 3]), 1, 8, 4)
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 1, 8, 4)
    with pytest.raises(ValueError, match="K >= 2"):
        dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 0]), 1, 8, 4)


def test_dkd_warmup_is_linear_from_epoch_one():
    assert dkd_warmup_weight(1, 20) == pytest.approx(0.05)
    assert dkd_warmup_weight(10, 20) == pytest.approx(0.5)
    assert dkd_warmup_weight(25, 20) == 1.0
    assert dkd_warmup_weight(3, 0) == 1.0 and dkd_warmup_weight(None, 20) == 1.0
    with pytest.raises(ValueError, match="epoch"):
        dkd_warmup_weight(-1, 20)


# ----------------------------------------------------------------------------------------------- standardisation


def test_standardize_hand_computed():
    assert torch.allclose(standardize_logits(t([1.0, 2.0, 3.0])), t([-1.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(standardize_logits(t([1.0, 2.0, 3.0]), 2.0), t([-0.5, 0.0, 0.5]), atol=1e-6)
    # LS3 numbers: KD of Z(teacher) against a uniform student, TCKD / NCKD with target 2
    z_t, z_s = standardize_logits(t([1.0, 2.0, 3.0])), standardize_logits(t([5.0, 5.0, 5.0]))
    assert torch.allclose(z_s, torch.zeros(1, 3, dtype=torch.float64))  # constant logits: std 0, eps keeps it finite
    assert kd_loss(z_s, z_t, 1.0).item() == pytest.approx(0.266217, abs=1e-6)
    out = dkd_loss(z_s, z_t, torch.tensor([2]), 1.0, 1.0, 1.0)
    assert out["tckd"].item() == pytest.approx(0.229077, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(0.110944, abs=1e-6)


def test_standardize_invariant_to_per_sample_shift_and_positive_scale():
    torch.manual_seed(1)
    z = torch.randn(6, 10, dtype=torch.float64)
    shift = torch.randn(6, 1, dtype=torch.float64) * 10
    scale = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.1
    assert torch.allclose(standardize_logits(z * scale + shift, 2.0), standardize_logits(z, 2.0), atol=1e-6)
    # a negative scale flips the order: not invariant (the test can fail)
    assert not torch.allclose(standardize_logits(-z), standardize_logits(z), atol=1e-3)
    # multi-scale logits (N, K, R): standardised per (sample, region) over the classes
    ms = torch.randn(3, 5, 4, dtype=torch.float64)
    per_region = torch.rand(3, 1, 4, dtype=torch.float64) + 0.5
    assert torch.allclose(standardize_logits(ms * per_region + 3.0), standardize_logits(ms), atol=1e-6)
    with pytest.raises(ValueError, match="base_temperature"):
        standardize_logits(z, 0.0)


# ------------------------------------------------------------------------------------------------------------ SDD


def test_region_pooling_for_m_12_and_124():
    feat = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)  # rows [0..3], [4..7], [8..11], [12..15]
    # M = [1, 2]: global mean 7.5, then quadrants TL {0,1,4,5} 2.5, TR {2,3,6,7} 4.5, BL {8,9,12,13} 10.5, BR 12.5
    assert region_pool(feat, [1, 2]).flatten().tolist() == [7.5, 2.5, 4.5, 10.5, 12.5]
    # M = [1, 2, 4]: R = 1 + 4 + 16 = 21, the 4×4 regions are the 16 dies themselves, row-major
    p124 = region_pool(feat, [1, 2, 4]).flatten().tolist()
    assert len(p124) == 21 and p124[:5] == [7.5, 2.5, 4.5, 10.5, 12.5] and p124[5:] == list(range(16))
    # through a shared classifier z = (v, −v) + (0, 1): logits (N, K, R)
    fc = torch.nn.Linear(1, 2).double()
    with torch.no_grad():
        fc.weight.copy_(t([1.0], [-1.0]))
        fc.bias.copy_(torch.tensor([0.0, 1.0], dtype=torch.float64))
    ms = multi_scale_logits(feat, fc, [1, 2])
    assert ms.shape == (1, 2, 5)
    assert ms[0, 0].tolist() == [7.5, 2.5, 4.5, 10.5, 12.5]
    assert ms[0, 1].tolist() == [-6.5, -1.5, -3.5, -9.5, -11.5]
    with pytest.raises(ValueError, match="start with 1"):
        region_pool(feat, [2, 4])
    with pytest.raises(ValueError, match="increasing"):
        region_pool(feat, [1, 1])


def _teacher(pred: list[list[int]], k: int = 2) -> torch.Tensor:
    """Teacher multi-scale logits (N, K, R) predicting class pred[n][r] with p = 3/4 (K = 2: logits ln 3 / 0)."""
    n, r = len(pred), len(pred[0])
    z = torch.zeros(n, k, r, dtype=torch.float64)
    for i, row in enumerate(pred):
        for j, c in enumerate(row):
            z[i, c, j] = LN(3)
    return z


def test_sdd_weights_and_loss_m_12():
    # target [0, 1]; region 0 is global. Sample 0: global right, locals predict [0, 1, 0, 1] → right, wrong, right,
    # wrong → weights [1, 1, 2, 1, 2]. Sample 1: global wrong (predicts 0), locals [0, 1, 1, 0] → wrong, right,
    # right, wrong → weights [1, 1, 2, 2, 1]. Σw = 14 over N·R = 10 rows.
    y = torch.tensor([0, 1])
    te = _teacher([[0, 0, 1, 0, 1], [0, 0, 1, 1, 0]])
    w = sdd_region_weights(te, y)
    assert w.tolist() == [[1, 1, 2, 1, 2], [1, 1, 2, 2, 1]]
    assert sdd_region_weights(te, y, complementary_weight=5.0)[0].tolist() == [1, 1, 5, 1, 5]
    # student all zeros: every row's KD is KD2 (both classes symmetric), so SDD-KD = KD2 · 14 / 10
    s = torch.zeros_like(te)
    assert sdd_kd_loss(s, te, y, 1.0).item() == pytest.approx(KD2 * 1.4, abs=1e-6)
    # K = 2: the non-target distribution has one class, NCKD = 0, TCKD = KD per row
    out = sdd_dkd_loss(s, te, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert out["nckd"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["tckd"].item() == pytest.approx(KD2 * 1.4, abs=1e-6)
    assert out["loss"].item() == pytest.approx(KD2 * 1.4, abs=1e-6)


def test_sdd_weights_and_loss_m_124():
    # R = 21. Sample 0 (target 0): global right, the four 2×2 regions right, all sixteen 4×4 wrong → 1 + 4 + 16·2 = 37.
    # Sample 1 (target 0): global wrong and every region wrong → all consistent, 21. Σw = 58 over 42 rows.
    y = torch.tensor([0, 0])
    te = _teacher([[0] * 5 + [1] * 16, [1] * 21])
    w = sdd_region_weights(te, y)
    assert w[0].tolist() == [1] * 5 + [2] * 16 and w[1].tolist() == [1] * 21
    s = torch.zeros_like(te)
    assert sdd_kd_loss(s, te, y, 1.0).item() == pytest.approx(KD2 * 58 / 42, abs=1e-6)
    # with M = [1] SDD-KD is plain KD on the global logits
    assert sdd_kd_loss(s[:, :, :1], te[:, :, :1], y, 1.0).item() == pytest.approx(
        kd_loss(s[:, :, 0], te[:, :, 0], 1.0).item(), abs=1e-9)


def test_sdd_dkd_three_classes_hand_computed():
    # K = 3, target 0, M = [1, 2] (R = 5). Rows predicting 0 have logits (ln 6, ln 3, 0): TCKD3, NCKD = KD2.
    # Rows predicting 1 have (ln 3, ln 6, 0): p_t = [0.3, 0.6, 0.1], TCKD = 0.3·ln 0.9 + 0.7·ln 1.05 = 0.002545,
    # NCKD = 6/7·ln(12/7) + 1/7·ln(2/7) = 0.283031. One sample: global right, regions [right, wrong, right, wrong]
    # → weights [1, 1, 2, 1, 2]; mean over 5 rows.
    right, wrong = [LN(6), LN(3), 0.0], [LN(3), LN(6), 0.0]
    te = torch.tensor([[right, right, wrong, right, wrong]], dtype=torch.float64).permute(0, 2, 1)  # (1, 3, 5)
    s, y = torch.zeros_like(te), torch.tensor([0])
    tw, nw = 0.0025449602, 0.2830308623
    out = sdd_dkd_loss(s, te, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert out["tckd"].item() == pytest.approx((3 * TCKD3 + 2 * 2 * tw) / 5, abs=1e-6)
    assert out["nckd"].item() == pytest.approx((3 * KD2 + 2 * 2 * nw) / 5, abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["tckd"].item() + 8 * out["nckd"].item(), abs=1e-9)


def test_sdd_lskd_fusion():
    torch.manual_seed(2)
    s_ms, t_ms = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 6, (4,))
    fused = sdd_lskd_loss(s_ms, t_ms, y, alpha=1.0, beta=8.0, base_temperature=2.0)
    # = SDD-DKD on Z-scored region logits at the base temperature
    ref = sdd_dkd_loss(standardize_logits(s_ms), standardize_logits(t_ms), y, 1.0, 8.0, 2.0)
    for k in ("tckd", "nckd", "loss"):
        assert fused[k].item() == pytest.approx(ref[k].item(), abs=1e-9)
    # τ²·KL of Z(z; τ): the same as dividing the Z-scores by τ and distilling at temperature 1, times τ²
    alt = sdd_dkd_loss(standardize_logits(s_ms, 2.0), standardize_logits(t_ms, 2.0), y, 1.0, 8.0, 1.0)
    assert fused["loss"].item() == pytest.approx(4 * alt["loss"].item(), abs=1e-9)
    # invariant to a per-(sample, region) shift and positive scale of either side's logits
    a = torch.rand(4, 1, 5, dtype=torch.float64) * 3 + 0.2
    moved = sdd_lskd_loss(s_ms * a - 7.0, t_ms * 2.0 + 1.0, y, 1.0, 8.0, 2.0)
    assert moved["loss"].item() == pytest.approx(fused["loss"].item(), abs=1e-6)
    # hand case (LS3), M = [1]: teacher (1, 2, 3) → Z = (−1, 0, 1), uniform student, target 2, τ = 1
    one = sdd_lskd_loss(torch.zeros(1, 3, 1), t([1.0, 2.0, 3.0]).view(1, 3, 1).float(), torch.tensor([2]),
                        alpha=1.0, beta=1.0, base_temperature=1.0)
    assert one["loss"].item() == pytest.approx(0.229077 + 0.110944, abs=1e-5)
    # self-distillation is zero
    assert sdd_lskd_loss(t_ms, t_ms.clone(), y, 1.0, 8.0, 2.0)["loss"].abs().item() < 1e-9


def test_sdd_errors():
    with pytest.raises(ValueError, match=r"\(N, K, R\)"):
        sdd_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), 4.0)
    with pytest.raises(ValueError, match="differ in shape"):
        sdd_dkd_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 21), torch.tensor([0, 1]), 1, 8, 4)


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_uniform_signature():
    assert set(DISTILLERS) == {"none", "kd", "dkd", "lskd_kd", "lskd_dkd", "sdd_kd", "sdd_dkd", "sdd_lskd"}
    torch.manual_seed(3)
    s_ms = torch.randn(4, 5, 5, requires_grad=True)
    t_ms, y = torch.randn(4, 5, 5), torch.tensor([0, 1, 2, 3])
    cfg = DistillSettings(epoch=10, warmup=20)
    ce = torch.nn.functional.cross_entropy(s_ms[:, :, 0], y)
    for name, fn in DISTILLERS.items():
        terms = fn(s_ms, t_ms, y, cfg)
        assert terms["loss_ce"].item() == pytest.approx(ce.item(), abs=1e-6), name
        assert ("loss_kd" in terms) == (name != "none"), name
        total = total_loss(terms)
        assert total.item() == pytest.approx(sum(v.item() for k, v in terms.items() if k.startswith("loss_")))
        total.backward()
        assert s_ms.grad is not None and torch.isfinite(s_ms.grad).all(), name
        s_ms.grad = None
    # values tie to the pure functions (warm-up 10/20 = 0.5 on DKD-based ones only)
    g = (s_ms[:, :, 0], t_ms[:, :, 0])
    assert DISTILLERS["kd"](s_ms, t_ms, y, cfg)["loss_kd"].item() == pytest.approx(kd_loss(*g, 4.0).item())
    assert DISTILLERS["dkd"](s_ms, t_ms, y, cfg)["loss_kd"].item() == pytest.approx(
        0.5 * dkd_loss(*g, y, 1.0, 8.0, 4.0)["loss"].item())
    assert DISTILLERS["sdd_lskd"](s_ms, t_ms, y, cfg)["loss_kd"].item() == pytest.approx(
        0.5 * sdd_lskd_loss(s_ms, t_ms, y, 1.0, 8.0, 2.0)["loss"].item())
    assert DISTILLERS["lskd_kd"](s_ms, t_ms, y, DistillSettings(kd_weight=9.0))["loss_kd"].item() == pytest.approx(
        9 * kd_loss(standardize_logits(g[0]), standardize_logits(g[1]), 2.0).item())
    # non-SDD distillers also take plain (N, K) logits
    assert DISTILLERS["dkd"](g[0], g[1], y, DistillSettings())["loss_kd"].item() == pytest.approx(
        dkd_loss(*g, y, 1.0, 8.0, 4.0)["loss"].item())


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown distiller 'fitnet'"):
        get_distiller("fitnet")
    with pytest.raises(ValueError, match="temperature"):
        DistillSettings(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        DistillSettings(beta=-1.0)
    with pytest.raises(ValueError, match=r"\(N, K, R\)"):
        DISTILLERS["sdd_dkd"](torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), DistillSettings())
    with pytest.raises(ValueError, match="no 'loss_"):
        total_loss({"tckd": torch.tensor(1.0)})
