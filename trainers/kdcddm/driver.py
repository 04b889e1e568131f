"""KDCDDM driver: prepare the training set, run each configured phase through trainers.launch, calibrate thresholds.

Every phase is its own Ray Train run `<run.name>-<phase>` (resumable: rerunning the same command continues each
unfinished phase from its latest checkpoint). Frozen networks a phase needs (the VAE for CDLDM; VAE + CDLDM for the
student) reach Ray workers through the object store. After a phase, the thresholds of its models are chosen on the
domain's validation split (never the test split) and written into the exported checkpoint's meta.json, so apps,
evaluation and Serve segment with them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from fabdistill import storage
from fabdistill.checkpoints import META_FILE, load_state, resolve_checkpoint
from fabdistill.inference.kdcddm import (Segmenter, choose_model_threshold, domain_kind, generate_pairs_table,
                                         held_out_pairs)
from fabdistill.methods import TrainOutcome
from trainers.kdcddm.config import Config
from trainers.kdcddm.loops import phase_loop
from trainers.launch import launch, run_dir


def prepare_training_data(cfg: Config) -> tuple[str, str]:
    """(URI of the training set, its Parquet kind); generated into <run>/data when data.train_uri is empty."""
    from data.parquet_io import read_dataset, write_dataset
    from data.schema import table_kind

    uri = cfg.data.train_uri
    if not uri:
        kind = domain_kind(cfg.data.domain)
        uri = storage.join(run_dir(cfg.run), "data", f"{kind}_train_{cfg.data.image_size}")
        if not storage.exists(uri):
            print(f"[kdcddm] generating {cfg.data.num_train} {kind} training pairs -> {uri}", flush=True)
            write_dataset(generate_pairs_table(cfg.data.domain, cfg.data.num_train, cfg.data.seed,
                                               cfg.data.image_size), uri, kind)
        return uri, kind
    kind = table_kind(read_dataset(uri).slice(0, 1))
    if kind not in ("sem", "wafer"):
        raise ValueError(f"data.train_uri {uri}: KDCDDM trains on 'sem' or 'wafer' datasets, got kind {kind!r}")
    return uri, kind


def _dependency(path: str, want: str) -> dict:
    """{"state", "meta"} of the networks of model `want` ("vae" or "cdldm") in a checkpoint or run folder."""
    state, meta = load_state(resolve_checkpoint(path))
    if meta.get("method") != "kdcddm" or want not in meta.get("models", {}):
        raise ValueError(f"{path}: not a KDCDDM {want} checkpoint (models: {list(meta.get('models', {}))})")
    if want == "vae":
        return {"state": state["models"]["vae"]["vae"], "meta": meta["models"]["vae"]["vae"]}
    return {"state": state["models"]["cdldm"], "meta": meta["models"]["cdldm"]}


def calibrate(checkpoint: str, cfg: Config) -> dict[str, float]:
    """Choose each model's threshold on the validation split and write it into the checkpoint's meta.json."""
    _, meta = load_state(checkpoint)
    val = held_out_pairs(cfg.data.domain, cfg.data.num_validation, cfg.data.image_size, "validation")
    thresholds = dict(meta.get("thresholds") or {})
    for model in meta["models"]:
        if model == "vae":
            continue  # the first stage segments nothing
        if cfg.inference.threshold >= 0:
            thresholds[model] = float(cfg.inference.threshold)
            continue
        thresholds[model] = choose_model_threshold(Segmenter.from_checkpoint(checkpoint, model), val)
        print(f"[kdcddm] {model}: threshold {thresholds[model]:.4f} (validation split, "
              f"{cfg.data.num_validation} images)", flush=True)
    meta["thresholds"] = thresholds
    storage.write_bytes(storage.join(checkpoint, META_FILE), json.dumps(meta, indent=2, default=str).encode())
    return thresholds


def train(cfg: Config, callbacks: Optional[list] = None) -> TrainOutcome:
    """Run the configured phases in order; one TrainOutcome with each phase's run in `.phases`."""
    cfg.check()
    if cfg.run.num_workers > 0:
        from trainers.launch import ensure_ray

        ensure_ray()
    uri, kind = prepare_training_data(cfg)
    base_meta = {"method": "kdcddm", "domain": cfg.data.domain, "image_size": cfg.data.image_size,
                 "diffusion": dataclasses.asdict(cfg.diffusion), "inference": dataclasses.asdict(cfg.inference)}
    deps: dict[str, Any] = {}
    if cfg.vae_checkpoint:
        deps["vae"] = _dependency(cfg.vae_checkpoint, "vae")
    if cfg.cdldm_checkpoint:
        deps["cdldm"] = _dependency(cfg.cdldm_checkpoint, "cdldm")
        deps.setdefault("vae", {"state": deps["cdldm"]["state"]["vae"], "meta": deps["cdldm"]["meta"]["vae"]})
    phases: dict[str, TrainOutcome] = {}
    for phase in cfg.phase_list():
        section = dataclasses.asdict(getattr(cfg, "vae" if phase == "vae" else phase))
        loop_config: dict[str, Any] = {"phase": phase, "section": section, "kind": kind,
                                       "image_size": cfg.data.image_size, "diffusion": base_meta["diffusion"],
                                       "inference": base_meta["inference"], "kl_weight": cfg.vae.kl_weight,
                                       "meta": {**base_meta, "phase": phase}}
        needed = {"cdldm": ("vae",), "student": ("vae", "cdldm")}.get(phase, ())
        if needed:
            phase_deps = {k: deps[k] for k in needed}
            if cfg.run.num_workers > 0:
                import ray

                loop_config["deps_ref"] = ray.put(phase_deps)
            else:
                loop_config["deps"] = phase_deps
        run = dataclasses.replace(cfg.run, name=f"{cfg.run.name}-{phase}")
        print(f"[kdcddm] phase {phase}: {section['steps']} steps on {cfg.run.num_workers} workers", flush=True)
        outcome = launch(phase_loop, loop_config, run, datasets={"train": uri}, full_config=cfg,
                         extra_callbacks=callbacks)
        if outcome.checkpoint_dir is None:
            raise RuntimeError(f"phase {phase} produced no checkpoint (run folder {outcome.run_dir})")
        calibrate(outcome.checkpoint_dir, cfg)
        phases[phase] = outcome
        if phase == "vae":
            deps["vae"] = _dependency(outcome.checkpoint_dir, "vae")
        elif phase == "cdldm":
            deps["cdldm"] = _dependency(outcome.checkpoint_dir, "cdldm")
    final = phases[cfg.phase_list()[-1]]
    return dataclasses.replace(final, phases=phases)


def phase_checkpoints(run_base: str) -> dict[str, str]:
    """{model: checkpoint} found under a run's phase folders `<run_base>-<phase>/model` (evaluation's "run" role)."""
    from trainers.kdcddm.config import PHASES

    found: dict[str, str] = {}
    for phase in PHASES:
        path = f"{run_base}-{phase}"
        try:
            ckpt = resolve_checkpoint(path)
        except FileNotFoundError:
            continue
        _, meta = load_state(ckpt)
        for model in meta.get("models", {}):
            if model != "vae":
                found[model] = ckpt
    if not found:
        raise FileNotFoundError(f"no KDCDDM phase checkpoints under {run_base}-<phase> "
                                f"(phases: {', '.join(PHASES)})")
    return found


__all__ = ["train", "calibrate", "prepare_training_data", "phase_checkpoints"]
