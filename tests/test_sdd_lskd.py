"""SDD-LSKD method (trainers/sdd_lskd.py) and what it adds around the tested building blocks: one classifier registry
(models/classifiers.py), the label-column option of data/datasets.py, the classifier's mixed-type data option, the
distillation step (teacher frozen), in-process and 2-worker Ray Train runs with checkpoint + resume, serving the
student through the classifier Serve kind, the sweep space and the CIFAR-100 path on a tiny fixture."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from fabdistill.config import ConfigError, load_config

TINY = ["run.num_workers=0", "data.n_train=96", "data.n_eval=40", "data.size=16", "teacher.arch=tiny",
        "teacher.epochs=1", "teacher.batch_size=32", "teacher.warmup_steps=1", "student.arch=shufflev1_tiny",
        "student.epochs=2", "student.batch_size=32", "student.warmup=2", "student.scales=[1,2]"]


def tiny_cfg(tmp_path, *extra):
    from trainers import sdd_lskd

    return load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", [f"run.storage_path={tmp_path}", *TINY, *extra])


# --------------------------------------------------------------------------- models/classifiers.py


def test_one_registry_builds_and_rebuilds_every_family_and_keeps_the_old_names():
    from models.classifiers import CLASSIFIER_ARCHS, build_classifier, classifier_from_meta, family_of
    from models.mobilenetv2 import MobileNetV2, mobilenetv2_from_meta
    from models.resnet_cifar import ResNet, build_resnet, resnet_from_meta
    from models.shufflenet import ShuffleNetV1, build_shufflenet, shufflenet_from_meta

    for arch, cls in (("tiny", ResNet), ("shufflev1_tiny", ShuffleNetV1), ("mobilenetv2_tiny", MobileNetV2)):
        net = build_classifier(arch, 38, 1)
        assert type(net) is cls and net.meta() == {"arch": arch, "num_classes": 38, "in_channels": 1}
        again = classifier_from_meta(net.meta())
        again.load_state_dict(net.state_dict())
        x = torch.randn(2, 1, 16, 16)
        assert torch.equal(again.eval()(x), net.eval()(x))
    assert family_of("resnet32x4") == "resnet" and family_of("shufflev1") == "shufflenet"
    assert {"resnet8x4", "resnet32x4", "shufflev1", "mobilenetv2", "mobilenetv2_w1"} <= set(CLASSIFIER_ARCHS)
    # the old per-family names still work, and still insist on their family
    assert isinstance(resnet_from_meta(build_resnet("tiny", 9, 1).meta()), ResNet)
    assert isinstance(shufflenet_from_meta(build_shufflenet("shufflev1_tiny", 9, 1).meta()), ShuffleNetV1)
    assert isinstance(mobilenetv2_from_meta({"arch": "mobilenetv2_tiny", "num_classes": 9, "in_channels": 1}),
                      MobileNetV2)
    with pytest.raises(ValueError, match="unknown ResNet arch 'shufflev1_tiny'"):
        resnet_from_meta({"arch": "shufflev1_tiny", "num_classes": 9, "in_channels": 1})
    with pytest.raises(ValueError, match="unknown classifier arch 'vgg8'.*mobilenetv2_tiny"):
        build_classifier("vgg8")
    with pytest.raises(ValueError, match=r"lacks \['in_channels'\]: not a classifier checkpoint"):
        classifier_from_meta({"arch": "tiny", "num_classes": 9})


def test_load_classifier_reads_any_family(tmp_path):
    from fabdistill.inference.classifier import load_classifier
    from models.classifiers import build_classifier
    from trainers.classifier import save_classifier

    net = build_classifier("mobilenetv2_tiny", 38, 1).eval()
    save_classifier(str(tmp_path / "m"), net, "wafer_pm1")
    model, meta = load_classifier(str(tmp_path / "m"))
    x = torch.randn(3, 1, 20, 20)
    assert meta["arch"] == "mobilenetv2_tiny" and torch.allclose(model(x), net(x))


# --------------------------------------------------------------------------- data: the label column, mixed maps


def test_label_column_reads_the_38_class_ids_and_defaults_stay():
    from data.datasets import TableDataset, batch_to_tensors, table_to_tensors
    from data.mixed_wafer import generate_mixed_wafer

    table = generate_mixed_wafer(24, seed=3, size=16)
    mixed = table["mixed_label"].to_numpy()
    assert (mixed >= 9).any()  # mixtures drawn: their nine-class label is −1
    plain = table_to_tensors(table, "wafer")
    assert plain["label"].tolist() == table["label"].to_numpy().tolist() and (plain["label"] == -1).any()
    t = table_to_tensors(table, "wafer", label_column="mixed_label")
    assert t["label"].tolist() == mixed.tolist() and t["wafer_map"].shape == (24, 1, 16, 16)
    assert TableDataset(table, "wafer", label_column="mixed_label")[5]["label"].item() == mixed[5]
    batch = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    assert batch_to_tensors(batch, "wafer", "mixed_label")["label"].tolist() == mixed.tolist()
    with pytest.raises(ValueError, match="lacks column 'nope' \\(the label_column\\)"):
        batch_to_tensors(batch, "wafer", "nope")
    with pytest.raises(ValueError, match="lacks the label_column 'nope'"):
        table_to_tensors(table, "wafer", label_column="nope")
    with pytest.raises(ValueError, match="'sem' data have no 'label' key"):
        batch_to_tensors(batch, "sem", "mixed_label")


def test_classifier_trains_on_generated_mixed_maps(tmp_path):
    from data.mixed_wafer import MIXED_CLASSES
    from fabdistill.inference.classifier import load_classifier
    from trainers import classifier

    cfg = load_config(classifier.Config, "configs/classifier_mixed.yaml", [
        f"run.storage_path={tmp_path}", "run.name=mix", "run.num_workers=0", "data.n_train=64", "data.n_eval=24",
        "data.size=16", "optim.epochs=1", "optim.batch_size=32", "optim.warmup_steps=1", "model.arch=shufflev1_tiny"])
    outcome = classifier.train(cfg)
    model, meta = load_classifier(outcome.checkpoint_dir)
    assert meta["classes"] == list(MIXED_CLASSES) and meta["arch"] == "shufflev1_tiny" and model.num_classes == 38
    table = classifier.evaluate({"model": outcome.run_dir},
                                classifier.EvalSettings(n=24, size=16, generator="mixed_wafer"), str(tmp_path / "ev"))
    assert table.row("model")["top1"] == pytest.approx(outcome.metrics["heldout_top1"])
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(table.report_path)
    assert [p.rsplit("/", 1)[-1] for p in pictures] == ["confusion_model.png", "examples_model.png",
                                                         "training_curves.png", "accuracy_curves.png"]
    bad = load_config(classifier.Config, "configs/classifier_mixed.yaml",
                      [f"run.storage_path={tmp_path}", "run.name=bad", "model.num_classes=9"])
    with pytest.raises(ConfigError, match="generated mixed_wafer maps need model.num_classes=38"):
        classifier.train(bad)
    with pytest.raises(ConfigError, match="needs 38 weights"):
        load_config(classifier.Config, "configs/classifier_mixed.yaml", ["data.class_weights=[1,2]"])


# --------------------------------------------------------------------------- the distillation step


@pytest.mark.parametrize("distiller", ["none", "kd", "dkd", "lskd_kd", "lskd_dkd", "sdd_kd", "sdd_dkd", "sdd_lskd"])
def test_distill_step_trains_the_student_and_never_moves_the_teacher(distiller):
    from models.classifiers import build_classifier
    from models.multiscale import MultiScaleNet
    from trainers.distillers import DistillSettings
    from trainers.sdd_lskd import distill_step, frozen_teacher

    torch.manual_seed(0)
    t_net = build_classifier("tiny", 5, 1)
    teacher = frozen_teacher({"model": t_net.state_dict()}, t_net.meta(), (1, 2))
    teacher.train()  # a careless caller: the step pins it back to eval
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MultiScaleNet(build_classifier("mobilenetv2_tiny", 5, 1), (1, 2))
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(2):
        terms, correct = distill_step(student, teacher, opt, x, y, distiller, DistillSettings(epoch=1, warmup=2))
    assert np.isfinite(terms["loss"]) and 0 <= correct <= 8 and not teacher.training
    assert (terms["loss_kd"] == 0.0) == (distiller == "none")
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # weights AND BN statistics
    assert all(not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(s_before[k], v) for k, v in student.state_dict().items())


def test_config_checks():
    from trainers import sdd_lskd

    with pytest.raises(ConfigError, match="student.scales"):
        load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", ["student.scales=[2,4]"])
    with pytest.raises(ConfigError, match="phase=student needs teacher_checkpoint"):
        load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", ["phase=student"])
    with pytest.raises(ConfigError, match="num_classes=38"):
        load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", ["model.num_classes=9"])
    with pytest.raises(ConfigError, match="held-out seed"):
        load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", ["data.seed=9001"])
    with pytest.raises(ConfigError, match="distiller"):
        load_config(sdd_lskd.Config, "configs/sdd_lskd.yaml", ["student.distiller=crd"])
    for name in ("sdd_lskd", "sdd_lskd_cifar100"):  # the shipped configs load
        load_config(sdd_lskd.Config, f"configs/{name}.yaml")


# --------------------------------------------------------------------------- whole runs


def test_teacher_then_student_in_process_gives_a_plain_classifier_checkpoint_that_serves(tmp_path):
    from data.mixed_wafer import MIXED_CLASSES
    from fabdistill.inference.classifier import load_classifier
    from fabdistill.methods import EvalTable, get_method
    from serve.schemas import StudentArgs
    from serve.students.classifier import ClassifierStudent
    from trainers import sdd_lskd
    from trainers.launch import read_metrics

    cfg = tiny_cfg(tmp_path, "run.name=both", "student.milestones=[0.5]")
    outcome = sdd_lskd.train(cfg)
    assert set(outcome.phases) == {"teacher", "student"} and outcome.run_dir.endswith("both-student")
    rows = read_metrics(outcome.run_dir)
    assert [r["epoch"] for r in rows] == [0, 1] and [r["step"] for r in rows] == [3, 6]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005])  # multistep ×0.1 after half the run
    teacher_top1 = outcome.phases["teacher"].metrics["heldout_top1"]
    assert all(r["teacher_heldout_top1"] == pytest.approx(teacher_top1) for r in rows)

    model, meta = load_classifier(outcome.checkpoint_dir)
    assert meta["arch"] == "shufflev1_tiny" and meta["distiller"] == "sdd_lskd" and meta["scales"] == [1, 2]
    assert meta["classes"] == list(MIXED_CLASSES) and meta["method"] == "sdd_lskd"
    # the served student is the plain classifier, through the classifier Serve kind's own load path
    served = ClassifierStudent(StudentArgs(checkpoint=outcome.checkpoint_dir, device="cpu"))
    maps = np.random.default_rng(0).integers(0, 3, (2, 16, 16)).tolist()
    req = served.validate_request("classify", {"maps": maps, "top_k": 3})
    probs = served.handle_batch("classify", [req])[0]
    assert probs.shape == (2, 38) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert served.describe()["method"] == "sdd_lskd"

    method = get_method("sdd_lskd")
    table = method.get("evaluate")({"teacher": outcome.phases["teacher"].run_dir, "student": outcome.run_dir},
                                   method.EvalSettings(n=40, size=16), str(tmp_path / "eval"))
    assert isinstance(table, EvalTable) and table.row("student")["distiller"] == "sdd_lskd"
    # the same held-out maps as the trainer's: the same numbers
    assert table.row("student")["top1"] == pytest.approx(rows[-1]["heldout_top1"])
    assert table.row("teacher")["top1"] == pytest.approx(teacher_top1)
    from fabdistill.reports import linked_pictures

    pictures = linked_pictures(str(tmp_path / "eval" / "report.md"))
    assert [p.rsplit("/", 1)[-1] for p in pictures] == [
        "confusion_teacher.png", "examples_teacher.png", "confusion_student.png", "examples_student.png",
        "training_curves.png", "accuracy_curves.png"]
    assert all(os.path.getsize(p) > 0 for p in pictures)

    # another distiller from the same teacher (phase student); a teacher of other classes is refused
    again = sdd_lskd.train(tiny_cfg(tmp_path, "run.name=dkd", "phase=student", "student.distiller=dkd",
                                    "student.arch=tiny", f"teacher_checkpoint={outcome.phases['teacher'].run_dir}"))
    assert load_classifier(again.checkpoint_dir)[1]["distiller"] == "dkd"
    other = tiny_cfg(tmp_path, "run.name=x", "phase=student", f"teacher_checkpoint={outcome.phases['teacher'].run_dir}")
    with pytest.raises(ValueError, match="teacher has 38 classes"):
        sdd_lskd.train(dataclasses.replace(other, model=dataclasses.replace(other.model, num_classes=9),
                                           data=dataclasses.replace(other.data, generator="wafer")))


def _teacher_checkpoint(path, num_classes=38, in_channels=1, arch="tiny"):
    from models.classifiers import build_classifier
    from trainers.classifier import save_classifier

    torch.manual_seed(1)
    save_classifier(str(path), build_classifier(arch, num_classes, in_channels), "wafer_pm1")
    return str(path)


def test_in_process_fault_restarts_from_the_checkpoint(tmp_path):
    from trainers import sdd_lskd
    from trainers.launch import read_metrics

    teacher = _teacher_checkpoint(tmp_path / "teacher")
    cfg = tiny_cfg(tmp_path, "run.name=f", "phase=student", f"teacher_checkpoint={teacher}", "student.epochs=3",
                   "run.crash_after_step=3", "run.max_failures=1", "student.distiller=sdd_dkd")
    outcome = sdd_lskd.train(cfg)
    assert outcome.error is None
    assert [r["step"] for r in read_metrics(outcome.run_dir)] == [3, 6, 9]


def test_two_worker_ray_run_of_a_distilled_student_checkpoints_and_resumes_after_all_workers_die(ray_local, tmp_path):
    from fabdistill.inference.classifier import load_classifier
    from trainers import sdd_lskd
    from trainers.launch import read_metrics

    teacher = _teacher_checkpoint(tmp_path / "teacher")
    cfg = tiny_cfg(tmp_path, "run.name=ddp", "phase=student", f"teacher_checkpoint={teacher}", "run.num_workers=2",
                   "run.cpus_per_worker=0.5", "student.batch_size=16", "student.epochs=3", "run.crash_after_step=3",
                   "run.max_failures=1", "student.distiller=sdd_lskd", "student.arch=tiny")
    outcome = sdd_lskd.train(cfg)
    assert outcome.error is None
    rows = read_metrics(outcome.run_dir)
    # 96 rows / (16 × 2 workers) = 3 steps per epoch; killed after epoch 0's checkpoint, each step kept once
    assert [r["step"] for r in rows] == [3, 6, 9], [r["step"] for r in rows]
    assert all(0 <= r["heldout_top1"] <= 1 for r in rows)
    _, meta = load_classifier(outcome.checkpoint_dir)
    assert meta["epoch"] == 2 and meta["distiller"] == "sdd_lskd"


def test_sweep_space_trains_the_teacher_once_and_scores_held_out_top1(tmp_path):
    from tune.spaces import ScoreSettings, get_space

    space = get_space("sdd_lskd")
    assert space.score_mode == "max" and {"alpha", "beta", "T", "base_temperature", "M", "warmup"} <= set(space.knobs)
    assert space.path_of("M") == "student.scales"
    base = space.prepare_base(tiny_cfg(tmp_path, "student.epochs=1"), str(tmp_path / "sweep"))
    assert base.phase == "student" and base.teacher_checkpoint.endswith("model")
    assert space.prepare_base(tiny_cfg(tmp_path), str(tmp_path / "sweep")).teacher_checkpoint == \
        base.teacher_checkpoint  # reused, not retrained
    trial = dataclasses.replace(base, run=dataclasses.replace(base.run, name="trial"))
    outcome = space.train_trial(trial, None)
    scored = space.score(outcome, trial, ScoreSettings(batch_size=64))
    assert scored["heldout_top1"] == pytest.approx(space.trained_run(outcome).metrics["heldout_top1"])


def test_cifar100_import_trains_teacher_and_student(tmp_path):
    try:
        from test_importers import make_cifar
    except ImportError:  # pragma: no cover
        from tests.test_importers import make_cifar
    from data.importers import import_cifar
    from data.parquet_io import write_dataset
    from trainers import sdd_lskd

    archive = tmp_path / "cifar-100-python.tar.gz"
    make_cifar(archive, 100)  # 5 train rows, 3 test rows, 100 classes
    write_dataset(import_cifar(str(archive)), str(tmp_path / "cifar100"), "image")
    cfg = load_config(sdd_lskd.Config, "configs/sdd_lskd_cifar100.yaml", [
        f"run.storage_path={tmp_path}", "run.name=c100", "run.num_workers=0", "run.use_gpu=false",
        f"data.uri={tmp_path / 'cifar100'}", "teacher.arch=tiny", "teacher.epochs=1", "teacher.batch_size=4",
        "student.arch=mobilenetv2_tiny", "student.epochs=1", "student.batch_size=4", "student.milestones=[0.5]"])
    outcome = sdd_lskd.train(cfg)
    metrics = outcome.metrics
    assert 0 <= metrics["heldout_top1"] <= 1 and metrics["step"] == 1  # 5 rows // batch 4 = 1 step
    from fabdistill.inference.classifier import load_classifier

    _, meta = load_classifier(outcome.checkpoint_dir)
    assert meta["num_classes"] == 100 and meta["in_channels"] == 3 and meta["encoding"] == "image_pm1"
    # the teacher and student held out the 3 test rows (a third of 3 is a possible score, 0.5 is not)
    assert round(metrics["heldout_top1"] * 3) == pytest.approx(metrics["heldout_top1"] * 3)
