"""The classifier's sweep space (tune/spaces.py MethodSpace): knobs, the held-out top-1 score, the ASHA metric.

Every trial is a plain `trainers.classifier.train(cfg, callbacks)`; the score is held-out top-1 of its exported
checkpoint on the config's held-out set (N = the sweep's score.n generated maps with data.eval_seed, or the
eval_uri / eval_split rows of real data), the same set the trainer reports as `heldout_top1`.

    python -m apps.sweep classifier --config configs/classifier_wafer.yaml --space lr=0.02,0.05,0.1

The classifier reports once per epoch, so `steps_path` is optim.epochs and ASHA measures progress in reports
(time_attr training_iteration).
"""

from __future__ import annotations

from typing import Any

from tune.spaces import MethodSpace, ScoreSettings


def score(outcome: Any, cfg: Any, settings: ScoreSettings) -> dict:
    """Held-out top-1 (and images/s) of the trial's checkpoint; `settings.n` generated maps when data are generated."""
    from trainers.classifier import EvalSettings, eval_source, evaluate

    if outcome.checkpoint_dir is None:
        raise ValueError("the trial produced no classifier checkpoint to score")
    source = eval_source(cfg.data, n=settings.n)
    if source is None:
        raise ValueError("the trial's config has no held-out data: set data.eval_uri (or use a dataset with a "
                         f"'{cfg.data.eval_split}' split)")
    eval_settings = EvalSettings(n=max(source["n"], 1), seed=source["seed"], size=source["size"],
                                 uri=source["uri"] or "", split=source["split"] or cfg.data.eval_split,
                                 generator=source["generator"],
                                 label_column="" if source["uri"] is None else source["label_column"],
                                 batch_size=settings.batch_size)
    row = evaluate({"model": outcome.checkpoint_dir}, eval_settings).row("model")
    return {"heldout_top1": row["top1"], "images_per_s": row["images_per_s"]}


SPACE = MethodSpace(
    method="classifier",
    knobs={"lr": "optim.lr", "weight_decay": "optim.weight_decay", "epochs": "optim.epochs",
           "batch_size": "optim.batch_size", "label_smoothing": "optim.label_smoothing", "arch": "model.arch"},
    labels={"lr": "lr", "weight_decay": "weight decay", "epochs": "epochs", "batch_size": "batch size",
            "label_smoothing": "label smoothing ε", "arch": "architecture"},
    score_name="heldout_top1", score_mode="max", score_label="held-out top-1 (N={n})",
    early_stop_metric="train_loss",
    steps_path="optim.epochs",
    time_attr="training_iteration",
    score=score,
)
