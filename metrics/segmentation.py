"""Pixel-level defect-segmentation metrics in numpy: AUROC, AP, PRO, IoU / Dice at a threshold, and the threshold.

Inputs: `scores` — anomaly score maps (higher = more defective), `masks` — ground-truth defect masks, both (N, H, W)
or (H, W) (numpy arrays or torch tensors); masks hold 0/1 (or bool). A pixel is predicted defective when
score >= threshold.

    pixel_auroc        area under the ROC curve over all pixels pooled; ties count ½ (Mann–Whitney U / (P·N))
    average_precision  Σ_k (R_k − R_{k−1}) · P_k over distinct score thresholds (step-wise, no interpolation;
                       the definition scikit-learn's average_precision_score uses)
    pro_score          per-region overlap (Bergmann et al., MVTec AD, IJCV 2021): each connected defect region
                       weighs the same however large it is; PRO(θ) = mean over regions of the fraction of the region
                       at score >= θ, plotted against the pixel FPR(θ), integrated up to FPR 0.3 (trapezoids,
                       interpolated at 0.3) and divided by 0.3, so a perfect map scores 1
    iou_dice           |P ∩ G| / |P ∪ G| and 2|P ∩ G| / (|P| + |G|) of the thresholded map, pooled over pixels or
                       averaged per image
    choose_threshold   the threshold maximising pooled F1 (= pooled Dice) on a validation split; pooled
                       IoU = F1 / (2 − F1) rises with F1, so the same threshold maximises IoU

Edge cases: AUROC, AP and PRO are undefined without both defect and clean pixels (PRO: without a defect region or a
clean pixel) and raise ValueError saying which is missing. IoU and Dice with an empty union (nothing predicted,
nothing true) are defined as 1 (perfect agreement), per pooled set or per image. Non-finite scores and non-binary
masks raise ValueError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pixel_auroc", "average_precision", "pro_score", "pro_curve", "label_regions", "iou_dice",
           "choose_threshold", "segmentation_metrics"]

PRO_MAX_FPR = 0.3  # MVTec AD integrates the PRO curve up to a false-positive rate of 30 %


####################################################################################################################
# Input checks
####################################################################################################################


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _inputs(scores: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scores float64, masks bool), both (N, H, W), after checking shapes, finiteness and binarity."""
    s, m = _numpy(scores), _numpy(masks)
    if s.shape != m.shape:
        raise ValueError(f"scores {s.shape} and masks {m.shape} must have the same shape")
    if s.ndim == 2:
        s, m = s[None], m[None]
    if s.ndim != 3 or s.size == 0:
        raise ValueError(f"expected non-empty (N, H, W) or (H, W) maps, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN or infinite values")
    if m.dtype != bool:
        values = np.unique(m)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"masks must be binary (0/1), found values {values[:8].tolist()}")
        m = m.astype(bool)
    return s, m


def _need_both(m: np.ndarray, what: str) -> None:
    if not m.any():
        raise ValueError(f"{what} is undefined: the masks have no defect pixel")
    if m.all():
        raise ValueError(f"{what} is undefined: every pixel is a defect pixel (no clean pixel)")


def _descending_groups(s: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sort pixels by score, highest first; cumulative sums of each weight at the end of each run of equal scores.

    Returns (distinct scores (K,) descending, [cumsum of each weight at those K thresholds]).
    """
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last index of each tie group
    return s_sorted[last], [np.cumsum(w[order])[last] for w in weights]


####################################################################################################################
# Threshold-free metrics
####################################################################################################################


def pixel_auroc(scores: Any, masks: Any) -> float:
    """Pixel AUROC in [0, 1]: 1 when every defect pixel outscores every clean pixel, 0 when the reverse, ½ for ties."""
    s, m = _inputs(scores, masks)
    _need_both(m, "AUROC")
    s, m = s.ravel(), m.ravel()
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value, so ties share their ranks
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    p, n = float(m.sum()), float((~m).sum())
    return float((ranks[m].sum() - p * (p + 1) / 2.0) / (p * n))  # Mann–Whitney U / (P·N)


def average_precision(scores: Any, masks: Any) -> float:
    """AP = Σ (R_k − R_{k−1}) P_k over distinct thresholds, highest first (R_0 = 0)."""
    s, m = _inputs(scores, masks)
    _need_both(m, "average precision")
    s, m = s.ravel(), m.ravel()
    _, (tp, seen) = _descending_groups(s, m.astype(np.float64), np.ones_like(s))
    precision, recall = tp / seen, tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


####################################################################################################################
# Connected regions and PRO
####################################################################################################################


def label_regions(masks: Any, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected defect regions: (N, H, W) or (H, W) binary → (labels int64 same shape, 0 = background, 1…K; K).

    connectivity 8 (MVTec AD's evaluation) or 4. Regions never span two images. Vectorised union–find: hook each
    edge's larger root to its smaller one, then jump pointers to the roots, until every edge joins one root.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m = _numpy(masks)
    if m.dtype != bool:
        if not np.isin(np.unique(m), (0, 1)).all():
            raise ValueError("masks must be binary (0/1)")
        m = m.astype(bool)
    squeeze = m.ndim == 2
    if squeeze:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (H, W) masks, got shape {m.shape}")
    _, h, w = m.shape
    idx = np.arange(m.size).reshape(m.shape)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    a_list, b_list = [], []
    for dy, dx in offsets:
        ys, yt = slice(0, h - dy), slice(dy, h)
        xs, xt = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        both = m[:, ys, xs] & m[:, yt, xt]  # pixel and its neighbour at (dy, dx) both defective
        a_list.append(idx[:, ys, xs][both])
        b_list.append(idx[:, yt, xt][both])
    a, b = np.concatenate(a_list), np.concatenate(b_list)
    parent = np.arange(m.size)
    while a.size:
        ra, rb = parent[a], parent[b]  # roots (parent is fully compressed here)
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointers only go to smaller indices, so this terminates at the roots
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    labels = np.zeros(m.size, np.int64)
    roots = parent[m.ravel()]
    _, labels[m.ravel()] = np.unique(roots, return_inverse=True)
    labels[m.ravel()] += 1
    count = int(labels.max()) if labels.size else 0
    labels = labels.reshape(m.shape)
    return (labels[0] if squeeze else labels), count


def pro_curve(scores: Any, masks: Any, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR (K+1,), PRO (K+1,), thresholds (K,)) over every distinct score, from (0, 0); both curves rise."""
    s, m = _inputs(scores, masks)
    labels, count = label_regions(m, connectivity)
    if count == 0:
        raise ValueError("PRO is undefined: the masks have no defect region")
    if m.all():
        raise ValueError("PRO is undefined: every pixel is a defect pixel (no clean pixel for the FPR)")
    sizes = np.bincount(labels.ravel(), minlength=count + 1).astype(np.float64)
    # each defect pixel contributes 1/(K·|its region|), so the K regions weigh the same
    overlap_weight = np.where(labels.ravel() > 0, 1.0 / (count * sizes[labels.ravel()]), 0.0)
    negatives = (~m).ravel().astype(np.float64)
    thresholds, (pro, fp) = _descending_groups(s.ravel(), overlap_weight, negatives)
    return np.r_[0.0, fp / negatives.sum()], np.r_[0.0, np.minimum(pro, 1.0)], thresholds


def pro_score(scores: Any, masks: Any, max_fpr: float = PRO_MAX_FPR, connectivity: int = 8) -> float:
    """Normalised area under the PRO-vs-FPR curve up to `max_fpr` (MVTec AD: 0.3), in [0, 1]."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    fpr, pro, _ = pro_curve(scores, masks, connectivity)
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:  # close the area at max_fpr, interpolating between the points around it
        j = int(np.searchsorted(fpr, max_fpr, side="right"))
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        x, y = np.r_[x, max_fpr], np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0) / max_fpr)


####################################################################################################################
# Thresholded metrics and the threshold
####################################################################################################################


def iou_dice(scores: Any, masks: Any, threshold: float, per_image: bool = False) -> tuple[float, float]:
    """(IoU, Dice) of `scores >= threshold` against the masks; pooled over all pixels, or the mean of per-image
    values when per_image. An empty union scores 1 (nothing to find, nothing predicted)."""
    s, m = _inputs(scores, masks)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    pred = s >= threshold
    axes = (1, 2) if per_image else (0, 1, 2)
    inter = (pred & m).sum(axis=axes).astype(np.float64)
    union = (pred | m).sum(axis=axes).astype(np.float64)
    total = pred.sum(axis=axes) + m.sum(axis=axes).astype(np.float64)
    empty = union == 0
    iou = np.where(empty, 1.0, inter / np.where(empty, 1.0, union))
    dice = np.where(empty, 1.0, 2.0 * inter / np.where(empty, 1.0, total))
    return float(np.mean(iou)), float(np.mean(dice))


def choose_threshold(scores: Any, masks: Any) -> float:
    """The threshold maximising pooled F1 (and so pooled IoU) of `scores >= threshold` on a validation split.

    Returns the midpoint between the best distinct score and the next lower one (the same split of the validation
    pixels, with a margin on both sides for unseen ones); the lowest score itself if the best is to predict all.
    Needs at least one defect pixel.
    """
    s, m = _inputs(scores, masks)
    if not m.any():
        raise ValueError("cannot choose a threshold: the validation masks have no defect pixel")
    thresholds, (tp, seen) = _descending_groups(s.ravel(), m.ravel().astype(np.float64), np.ones(s.size))
    positives = tp[-1]
    f1 = 2.0 * tp / (seen + positives)  # 2TP / (2TP + FP + FN), with TP + FP = seen, TP + FN = positives
    best = int(np.argmax(f1))
    if best + 1 < thresholds.size:
        return float((thresholds[best] + thresholds[best + 1]) / 2.0)
    return float(thresholds[best])


def segmentation_metrics(scores: Any, masks: Any, threshold: float, max_fpr: float = PRO_MAX_FPR) -> dict[str, float]:
    """All pixel metrics of one model on one split: {"auroc", "ap", "pro", "iou", "dice"} (IoU/Dice pooled)."""
    iou, dice = iou_dice(scores, masks, threshold)
    return {"auroc": pixel_auroc(scores, masks), "ap": average_precision(scores, masks),
            "pro": pro_score(scores, masks, max_fpr), "iou": iou, "dice": dice}
