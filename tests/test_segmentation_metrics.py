"""metrics/segmentation.py against hand-computed masks and score maps (worked numbers in the comments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.segmentation import (average_precision, choose_threshold, iou_dice, label_regions, pixel_auroc,
                                  pro_curve, pro_score, segmentation_metrics)

MASK = np.array([[0, 0, 1, 1]])
SCORES = np.array([[0.1, 0.4, 0.35, 0.8]])

# Two regions under 8-connectivity: A = (0,0),(0,1) and B = (1,3); five clean pixels.
PRO_MASK = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]])
PRO_SCORES = np.array([[[0.9, 0.5, 0.7, 0.1], [0.1, 0.1, 0.1, 0.8]]])


def test_auroc_perfect_reversed_tied_and_hand_case():
    assert pixel_auroc(MASK.astype(float), MASK) == 1.0  # the mask itself is a perfect score map
    assert pixel_auroc(1.0 - MASK, MASK) == 0.0  # reversed
    assert pixel_auroc(np.zeros((1, 4)), MASK) == 0.5  # all tied
    # defect scores {0.35, 0.8} vs clean {0.1, 0.4}: 3 of the 4 pairs ordered right → 0.75
    assert pixel_auroc(SCORES, MASK) == pytest.approx(0.75)
    # a tie between a defect and a clean pixel counts ½: defect {0.4, 0.8} vs clean {0.1, 0.4} → (1 + ½ + 2) / 4
    assert pixel_auroc(np.array([[0.1, 0.4, 0.4, 0.8]]), MASK) == pytest.approx(0.875)


def test_average_precision_hand_case():
    # thresholds 0.8: P 1, R ½; 0.4: P ½, R ½; 0.35: P ⅔, R 1 → AP = ½·1 + 0·½ + ½·⅔ = 0.8333
    assert average_precision(SCORES, MASK) == pytest.approx(5 / 6)
    assert average_precision(MASK.astype(float), MASK) == 1.0
    # all tied: one threshold, precision = prevalence ½, recall 1 → AP ½
    assert average_precision(np.zeros((1, 4)), MASK) == pytest.approx(0.5)
    # reversed: threshold 1 takes the two clean pixels (P 0, R 0), then 0 takes all (P ½, R 1) → AP = 1 · ½
    assert average_precision(1.0 - MASK, MASK) == pytest.approx(0.5)


def test_iou_and_dice_of_known_overlaps():
    gt = np.array([[[0, 1, 1, 0]]])
    pred_scores = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    # prediction {0, 1}, truth {1, 2}: |∩| = 1, |∪| = 3 → IoU ⅓, Dice 2·1 / (2 + 2) = ½
    assert iou_dice(pred_scores, gt, 0.5) == pytest.approx((1 / 3, 0.5))
    # a second image with nothing true and nothing predicted: per-image mean (⅓ + 1)/2, (½ + 1)/2;
    # pooled, the empty image adds nothing
    two_gt = np.concatenate([gt, np.zeros_like(gt)])
    two_pred = np.concatenate([pred_scores, np.zeros_like(pred_scores)])
    assert iou_dice(two_pred, two_gt, 0.5, per_image=True) == pytest.approx((2 / 3, 0.75))
    assert iou_dice(two_pred, two_gt, 0.5) == pytest.approx((1 / 3, 0.5))
    assert iou_dice(np.zeros((1, 3)), np.zeros((1, 3)), 0.5) == (1.0, 1.0)  # empty union: defined as 1
    assert iou_dice(gt.astype(float), gt, 1.0) == (1.0, 1.0)  # score >= threshold is positive
    assert iou_dice(np.ones((1, 1, 4)), gt, 0.5) == pytest.approx((0.5, 2 / 3))  # all predicted: 2/4, 4/6


def test_label_regions_connectivity_and_image_boundaries():
    diagonal = np.array([[1, 0], [0, 1]])
    assert label_regions(diagonal, connectivity=4)[1] == 2
    labels, count = label_regions(diagonal, connectivity=8)
    assert count == 1 and labels[0, 0] == labels[1, 1] == 1 and labels[0, 1] == 0
    # the same pixel in two stacked images is two regions, not one
    assert label_regions(np.ones((2, 1, 2)), connectivity=8)[1] == 2
    # a U shape joins only through its bottom row; two separate blobs stay apart
    u = np.array([[1, 0, 1, 0, 1], [1, 0, 1, 0, 0], [1, 1, 1, 0, 1]])
    labels, count = label_regions(u, connectivity=4)
    assert count == 3 and labels[0, 0] == labels[0, 2] and labels[0, 4] != labels[2, 4]
    assert label_regions(np.zeros((3, 3)))[1] == 0
    with pytest.raises(ValueError, match="connectivity"):
        label_regions(u, connectivity=6)


def test_pro_two_region_case():
    # Descending thresholds: 0.9 → A half found: PRO (½ + 0)/2 = ¼, FPR 0; 0.8 → B found: PRO ¾, FPR 0;
    # 0.7 → a clean pixel: FPR 1/5 = 0.2; 0.5 → A complete: PRO 1; 0.1 → everything: FPR 1.
    fpr, pro, thresholds = pro_curve(PRO_SCORES, PRO_MASK)
    assert np.allclose(fpr, [0, 0, 0, 0.2, 0.2, 1.0]) and np.allclose(pro, [0, 0.25, 0.75, 0.75, 1.0, 1.0])
    assert np.allclose(thresholds, [0.9, 0.8, 0.7, 0.5, 0.1])
    # area up to FPR 0.3: 0.2 · ¾ (from 0 to 0.2) + 0.1 · 1 (0.2 to 0.3) = 0.25; normalised by 0.3 → 0.8333
    assert pro_score(PRO_SCORES, PRO_MASK) == pytest.approx(0.25 / 0.3)
    # up to FPR 1: 0.15 + 0.8 · 1 = 0.95
    assert pro_score(PRO_SCORES, PRO_MASK, max_fpr=1.0) == pytest.approx(0.95)
    # cut at 0.1, interpolated on the segment (0, ¾) → (0.2, ¾): area 0.075 / 0.1 = ¾
    assert pro_score(PRO_SCORES, PRO_MASK, max_fpr=0.1) == pytest.approx(0.75)
    assert pro_score(PRO_MASK.astype(float), PRO_MASK) == pytest.approx(1.0)  # perfect map
    # per region, not per pixel: finding only B (one pixel) scores ½ of PRO although it is ⅓ of the defect pixels
    only_b = np.zeros_like(PRO_SCORES)
    only_b[0, 1, 3] = 1.0
    # (curve (0, 0) → (0, ½) → (1, 1): area (½ + 1)/2 = 0.75)
    assert pro_score(only_b, PRO_MASK, max_fpr=1.0) == pytest.approx(0.75)


def test_choose_threshold_maximises_f1_on_validation():
    # PRO case: thresholds 0.9, 0.8, 0.7, 0.5, 0.1 give F1 = 2TP / (seen + 3) = 2/4, 4/5, 4/6, 6/7, 6/11;
    # the best is 0.5 (TP 3, FP 1), returned as the midpoint to the next lower score: (0.5 + 0.1)/2 = 0.3
    assert choose_threshold(PRO_SCORES, PRO_MASK) == pytest.approx(0.3)
    iou, dice = iou_dice(PRO_SCORES, PRO_MASK, 0.3)
    assert dice == pytest.approx(6 / 7) and iou == pytest.approx(dice / (2 - dice))
    # separable scores: the threshold falls between the best clean score and the worst defect score
    thr = choose_threshold(np.array([[0.1, 0.2, 0.6, 0.9]]), np.array([[0, 0, 1, 1]]))
    assert thr == pytest.approx(0.4)
    # everything defective: predicting all is best; the threshold is the lowest score
    assert choose_threshold(np.array([[0.3, 0.7]]), np.array([[1, 1]])) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no defect pixel"):
        choose_threshold(PRO_SCORES, np.zeros_like(PRO_MASK))


def test_edge_cases_raise_clear_errors():
    none_true, all_true = np.zeros((2, 2)), np.ones((2, 2))
    for fn in (pixel_auroc, average_precision, pro_score):
        with pytest.raises(ValueError, match="no defect"):
            fn(np.random.rand(2, 2), none_true)
        with pytest.raises(ValueError, match="no clean pixel"):
            fn(np.random.rand(2, 2), all_true)
    with pytest.raises(ValueError, match="binary"):
        pixel_auroc(np.random.rand(2, 2), np.array([[0, 255], [0, 255]]))
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(np.random.rand(2, 2), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.array([[np.nan, 1.0]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="max_fpr"):
        pro_score(PRO_SCORES, PRO_MASK, max_fpr=0.0)
    with pytest.raises(ValueError, match="threshold"):
        iou_dice(PRO_SCORES, PRO_MASK, float("nan"))


def test_torch_inputs_and_the_combined_report():
    out = segmentation_metrics(torch.from_numpy(PRO_SCORES), torch.from_numpy(PRO_MASK).bool(), 0.3)
    assert set(out) == {"auroc", "ap", "pro", "iou", "dice"}
    assert out["pro"] == pytest.approx(0.25 / 0.3) and out["dice"] == pytest.approx(6 / 7)
    # AUROC of the PRO case: defect {0.9, 0.5, 0.8} vs clean {0.7, 0.1 ×4}: 15 pairs, 0.5 loses to 0.7 → 14/15
    assert out["auroc"] == pytest.approx(14 / 15)
