"""Logit-distillation losses as small pure functions, and a registry that picks one by name.

Notation: z_s, z_t student / teacher logits (N, K); y the targets (N,); T a temperature; p = softmax(z / T);
KL(a ‖ b) = Σ_k a_k (log a_k − log b_k), summed over classes, averaged over the batch ("batchmean").
Multi-scale logits (SDD) are (N, K, R) as the SDD reference lays them out: R regions, region 0 the global logit
(models/multiscale.py builds them; `region_pool` and `multi_scale_logits` are re-exported here).

    kd_loss             Hinton et al. 2015, Eq. 1 (softmax at T), §2 (× T²):  T² · KL(p_t ‖ p_s)
    dkd_loss            Zhao et al. CVPR 2022 (DKD) §3.1–3.2:  α · TCKD + β · NCKD
    dkd_warmup_weight   DKD / mdistiller schedule:  min(epoch / warmup, 1)
    standardize_logits  Sun et al. CVPR 2024 (LSKD), Z-score pre-process:  (z − mean z) / (1e-7 + std z) / τ
    sdd_region_weights  Wei et al. CVPR 2024 (SDD):  w_r = 2 (complementary) if [argmax z_t,r = y] ≠
                        [argmax z_t,0 = y], else 1 (consistent)
    sdd_kd_loss         SDD, L_SDD = D_con + β·D_com with KD per region:  Σ_{n,r} w_nr · KD_nr / (N·R)
    sdd_dkd_loss        SDD with DKD per region:  Σ_{n,r} w_nr · DKD_nr / (N·R)
    sdd_lskd_loss       the seed's fusion, SDD-DKD on Z-scored region logits at the base temperature τ

Reductions follow the references exactly: the SDD losses divide the weighted sum by the number of (sample, region)
rows, not by the sum of weights, so complementary regions add loss rather than re-normalise it.

`DISTILLERS[name](student_ms, teacher_ms, target, settings) -> dict` is the uniform interface a trainer uses
(mdistiller style): keys starting with "loss_" are the terms to add up (`total_loss`), the others are detached
diagnostics for logging. `settings.epoch` drives DKD's warm-up (`dataclasses.replace(settings, epoch=e)` per epoch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from models.multiscale import multi_scale_logits, region_pool  # noqa: F401  (SDD helpers, re-exported)

__all__ = [
    "kd_loss", "dkd_loss", "dkd_warmup_weight", "standardize_logits", "sdd_region_weights", "sdd_kd_loss",
    "sdd_dkd_loss", "sdd_lskd_loss", "region_pool", "multi_scale_logits", "DistillSettings", "DISTILLERS",
    "get_distiller", "total_loss",
]

REDUCTIONS = ("mean", "none")


####################################################################################################################
# checks
####################################################################################################################


def _check_pair(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher {what} differ in shape: "
                         f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
    if student.ndim < 2 or student.shape[1] < 2:
        raise ValueError(f"{what} must be (N, K, ...) with K >= 2 classes, got {tuple(student.shape)}")


def _check_target(target: Tensor, n: int, k: int) -> None:
    if target.shape != (n,) or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must be an integer tensor of shape ({n},), got {target.dtype} {tuple(target.shape)}")
    if n and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"target values must be class ids in [0, {k}), got range "
                         f"[{int(target.min())}, {int(target.max())}]")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _kl_rows(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """KL(p_t ‖ p_s) per row of log-probabilities (N, K) → (N,); 0·log 0 = 0 where the teacher puts no mass."""
    p_t = log_p_t.exp()
    return torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(1)


####################################################################################################################
# KD, DKD, logit standardisation
####################################################################################################################


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str = "mean") -> Tensor:
    """Hinton KD on (N, K) logits → scalar (or (N,) with reduction="none")."""
    _check_pair(student_logits, teacher_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    # Hinton 2015 Eq. 1: q_i = exp(z_i/T) / Σ_j exp(z_j/T); the soft-target gradients scale as 1/T², hence × T² (§2)
    per = _kl_rows(F.log_softmax(teacher_logits / t, 1), F.log_softmax(student_logits / t, 1)) * t * t  # (N,)
    return _reduce(per, reduction)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float, reduction: str = "mean") -> dict[str, Tensor]:
    """Decoupled KD on (N, K) logits → {"tckd", "nckd", "loss" = α·tckd + β·nckd} (scalars, or (N,) each).

    TCKD = T²·KL(b_t ‖ b_s) over the binary split b = [p_y, 1 − p_y]; NCKD = T²·KL(p̂_t ‖ p̂_s) over the K − 1
    non-target classes renormalised (the reference's softmax(z/T − 1000·gt_mask), computed exactly here).
    """
    _check_pair(student_logits, teacher_logits)
    n, k = student_logits.shape
    _check_target(target, n, k)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    y = target.long().view(n, 1)
    gt = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, y, True)  # (N, K)
    ls_s, ls_t = F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1)  # (N, K)

    def binary(log_p: Tensor) -> Tensor:  # DKD §3.1: b = [p_y, p_\y] as log-probabilities (N, 2)
        log_in = log_p.gather(1, y)  # (N, 1)
        log_out = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), 1, keepdim=True)  # (N, 1)
        return torch.cat([log_in, log_out], 1)

    tckd = _kl_rows(binary(ls_t), binary(ls_s)) * t * t  # DKD §3.1: TCKD = KL(b^T ‖ b^S)
    nt_s = student_logits[~gt].view(n, k - 1) / t  # (N, K−1) non-target logits
    nt_t = teacher_logits[~gt].view(n, k - 1) / t
    nckd = _kl_rows(F.log_softmax(nt_t, 1), F.log_softmax(nt_s, 1)) * t * t  # DKD §3.1: NCKD = KL(p̂^T ‖ p̂^S)
    loss = alpha * tckd + beta * nckd  # DKD §3.2: DKD = α·TCKD + β·NCKD
    return {"tckd": _reduce(tckd, reduction), "nckd": _reduce(nckd, reduction), "loss": _reduce(loss, reduction)}


def dkd_warmup_weight(epoch: Optional[float], warmup: float) -> float:
    """Linear warm-up of the DKD term: min(epoch / warmup, 1) with epochs counted from 1 as in mdistiller
    (epoch 1 of a 20-epoch warm-up → 0.05); warmup <= 0 or epoch None → 1 (no warm-up)."""
    if epoch is None or warmup <= 0:
        return 1.0
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return min(float(epoch) / float(warmup), 1.0)


def standardize_logits(logits: Tensor, base_temperature: float = 1.0, eps: float = 1e-7) -> Tensor:
    """Z-score each logit vector over its classes (dim 1), then divide by the base temperature τ; any shape (N, K, ...).

    LSKD's Z(z; τ) = (z − z̄) / (σ(z) · τ), σ the unbiased std (torch's default, as the reference) plus 1e-7.
    Invariant to a per-sample shift and positive scale of z, so the student need not match the teacher's
    logit range, only its relations.
    """
    if logits.ndim < 2 or logits.shape[1] < 2:
        raise ValueError(f"standardize_logits needs (N, K, ...) logits with K >= 2, got {tuple(logits.shape)}")
    if base_temperature <= 0:
        raise ValueError(f"base_temperature must be > 0, got {base_temperature}")
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (eps + std) / float(base_temperature)  # LSKD: Z(z; τ) = (z − z̄)/σ(z)/τ


####################################################################################################################
# SDD: multi-scale logits, consistent / complementary regions
####################################################################################################################


def _check_multi(student_ms: Tensor, teacher_ms: Tensor, target: Tensor) -> tuple[int, int, int]:
    if student_ms.ndim != 3:
        raise ValueError(f"multi-scale logits must be (N, K, R), got shape {tuple(student_ms.shape)}")
    _check_pair(student_ms, teacher_ms, "multi-scale logits")
    n, k, r = student_ms.shape
    _check_target(target, n, k)
    return n, k, r


def _rows(ms: Tensor) -> Tensor:
    """(N, K, R) → (N·R, K) with row n·R + r = sample n, region r."""
    n, k, r = ms.shape
    return ms.permute(0, 2, 1).reshape(n * r, k)


def sdd_region_weights(teacher_ms: Tensor, target: Tensor, complementary_weight: float = 2.0) -> Tensor:
    """SDD's weights (N, R) from the teacher's multi-scale logits (N, K, R) and the targets (N,).

    A region is consistent (weight 1) when the teacher's region prediction is right exactly when its global
    prediction (region 0) is right — both correct or both wrong — and complementary (weight `complementary_weight`,
    2 in SDD) when they differ: global right but local wrong, or global wrong but local right. Region 0 is always
    consistent. (As the reference: correctness against the target, not agreement of the predicted classes.)
    """
    if teacher_ms.ndim != 3:
        raise ValueError(f"multi-scale logits must be (N, K, R), got shape {tuple(teacher_ms.shape)}")
    n, k, r = teacher_ms.shape
    _check_target(target, n, k)
    correct = teacher_ms.detach().argmax(dim=1) == target.long().view(n, 1)  # (N, R)
    complementary = correct != correct[:, :1]  # (N, R); column 0 is False
    return torch.where(complementary, float(complementary_weight), 1.0).to(teacher_ms.dtype)


def sdd_kd_loss(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, temperature: float,
                complementary_weight: float = 2.0) -> Tensor:
    """SDD-KD: KD per region, consistent regions ×1, complementary ×2, averaged over the N·R rows → scalar."""
    n, _, r = _check_multi(student_ms, teacher_ms, target)
    w = sdd_region_weights(teacher_ms, target, complementary_weight)  # (N, R)
    per = kd_loss(_rows(student_ms), _rows(teacher_ms), temperature, reduction="none").view(n, r)  # (N, R)
    return (w * per).sum() / (n * r)  # SDD: L_SDD = D_con + β·D_com, β = complementary_weight


def sdd_dkd_loss(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, alpha: float, beta: float,
                 temperature: float, complementary_weight: float = 2.0) -> dict[str, Tensor]:
    """SDD-DKD: DKD per region, weighted as sdd_kd_loss → {"tckd", "nckd", "loss"} (weighted means over N·R rows)."""
    n, _, r = _check_multi(student_ms, teacher_ms, target)
    w = sdd_region_weights(teacher_ms, target, complementary_weight).reshape(n * r)  # (N·R,)
    terms = dkd_loss(_rows(student_ms), _rows(teacher_ms), target.long().repeat_interleave(r), alpha, beta,
                     temperature, reduction="none")  # each (N·R,)
    return {name: (w * v).sum() / (n * r) for name, v in terms.items()}  # SDD: D_con + β·D_com per DKD term


def sdd_lskd_loss(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, alpha: float, beta: float,
                  base_temperature: float, complementary_weight: float = 2.0) -> dict[str, Tensor]:
    """SDD-LSKD (the seed's fusion): every region's logits Z-scored (teacher and student alike), then SDD-DKD at
    the base temperature. Standardisation keeps each region's argmax, so the region weights are SDD-DKD's."""
    _check_multi(student_ms, teacher_ms, target)
    return sdd_dkd_loss(standardize_logits(student_ms), standardize_logits(teacher_ms), target, alpha, beta,
                        base_temperature, complementary_weight)  # Z(z; 1) then /τ inside: τ²·KL of Z(z; τ)


####################################################################################################################
# registry: one uniform call per distiller
####################################################################################################################


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """Loss settings shared by every distiller (defaults: mdistiller's DKD on CIFAR-100, LSKD's base temperature)."""

    ce_weight: float = 1.0  # weight of the cross-entropy on the student's global logits
    kd_weight: float = 1.0  # multiplies the distillation term (LSKD's KD+LS recipe: 9, with ce_weight 0.1)
    temperature: float = 4.0  # T of kd, dkd, sdd_kd, sdd_dkd
    base_temperature: float = 2.0  # τ after Z-scoring: lskd_kd, lskd_dkd, sdd_lskd (the seed's SDD-LSKD config: 4)
    alpha: float = 1.0  # DKD's TCKD weight
    beta: float = 8.0  # DKD's NCKD weight
    warmup: float = 20.0  # epochs of DKD's linear warm-up (DKD-based distillers only, as the references)
    complementary_weight: float = 2.0  # SDD's weight of complementary regions
    epoch: Optional[float] = None  # current epoch, counted from 1; None = warm-up over

    def __post_init__(self) -> None:
        for name in ("temperature", "base_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DistillSettings.{name} must be > 0, got {getattr(self, name)}")
        for name in ("ce_weight", "kd_weight", "alpha", "beta", "warmup", "complementary_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillSettings.{name} must be >= 0, got {getattr(self, name)}")


Distiller = Callable[[Tensor, Tensor, Tensor, DistillSettings], dict[str, Tensor]]


def _global(ms: Tensor) -> Tensor:
    """Global logits (N, K) from (N, K) or multi-scale (N, K, R) logits (region 0)."""
    if ms.ndim == 3:
        return ms[:, :, 0]
    if ms.ndim == 2:
        return ms
    raise ValueError(f"logits must be (N, K) or multi-scale (N, K, R), got shape {tuple(ms.shape)}")


def _ce(student_ms: Tensor, target: Tensor, s: DistillSettings) -> Tensor:
    z = _global(student_ms)
    _check_target(target, z.shape[0], z.shape[1])
    return s.ce_weight * F.cross_entropy(z, target.long())


def _with_dkd(out: dict[str, Tensor], terms: dict[str, Tensor], s: DistillSettings) -> dict[str, Tensor]:
    w = dkd_warmup_weight(s.epoch, s.warmup)
    out["loss_kd"] = s.kd_weight * w * terms["loss"]
    out.update({"tckd": terms["tckd"].detach(), "nckd": terms["nckd"].detach(),
                "warmup_weight": torch.tensor(w, device=terms["loss"].device)})
    return out


def _none(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    return {"loss_ce": _ce(student_ms, target, s)}


def _kd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    return {"loss_ce": _ce(student_ms, target, s),
            "loss_kd": s.kd_weight * kd_loss(_global(student_ms), _global(teacher_ms), s.temperature)}


def _lskd_kd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    zs, zt = standardize_logits(_global(student_ms)), standardize_logits(_global(teacher_ms))
    return {"loss_ce": _ce(student_ms, target, s), "loss_kd": s.kd_weight * kd_loss(zs, zt, s.base_temperature)}


def _dkd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    terms = dkd_loss(_global(student_ms), _global(teacher_ms), target, s.alpha, s.beta, s.temperature)
    return _with_dkd({"loss_ce": _ce(student_ms, target, s)}, terms, s)


def _lskd_dkd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    zs, zt = standardize_logits(_global(student_ms)), standardize_logits(_global(teacher_ms))
    terms = dkd_loss(zs, zt, target, s.alpha, s.beta, s.base_temperature)
    return _with_dkd({"loss_ce": _ce(student_ms, target, s)}, terms, s)


def _sdd_kd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    loss = sdd_kd_loss(student_ms, teacher_ms, target, s.temperature, s.complementary_weight)
    return {"loss_ce": _ce(student_ms, target, s), "loss_kd": s.kd_weight * loss}


def _sdd_dkd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    terms = sdd_dkd_loss(student_ms, teacher_ms, target, s.alpha, s.beta, s.temperature, s.complementary_weight)
    return _with_dkd({"loss_ce": _ce(student_ms, target, s)}, terms, s)


def _sdd_lskd(student_ms: Tensor, teacher_ms: Tensor, target: Tensor, s: DistillSettings) -> dict[str, Tensor]:
    terms = sdd_lskd_loss(student_ms, teacher_ms, target, s.alpha, s.beta, s.base_temperature,
                          s.complementary_weight)
    return _with_dkd({"loss_ce": _ce(student_ms, target, s)}, terms, s)


# name → distiller; the SDD ones need multi-scale logits (N, K, R), the others use region 0 (or plain (N, K))
DISTILLERS: dict[str, Distiller] = {
    "none": _none,
    "kd": _kd,
    "dkd": _dkd,
    "lskd_kd": _lskd_kd,
    "lskd_dkd": _lskd_dkd,
    "sdd_kd": _sdd_kd,
    "sdd_dkd": _sdd_dkd,
    "sdd_lskd": _sdd_lskd,
}
MULTI_SCALE_DISTILLERS: frozenset[str] = frozenset({"sdd_kd", "sdd_dkd", "sdd_lskd"})


def get_distiller(name: str) -> Distiller:
    """The distiller registered under `name`, or a ValueError listing the choices."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}; choose one of {', '.join(DISTILLERS)}")
    return DISTILLERS[name]


def total_loss(terms: Mapping[str, Tensor]) -> Tensor:
    """Sum of the "loss_*" terms of a distiller's output (the diagnostics are left out)."""
    losses = [v for key, v in terms.items() if key.startswith("loss_")]
    if not losses:
        raise ValueError(f"no 'loss_*' terms to add up in {sorted(terms)}")
    return torch.stack([v.reshape(()) for v in losses]).sum()
