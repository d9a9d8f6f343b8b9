"""The adapt stage on small real subsets (Kermany → NIH at 32×32): it aligns, selects, fails cleanly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.crosssim.adapt import Adapter, recalibrate_batchnorm
from pipeline.crosssim.engine import UNLABELLED, DomainBatches, EvaluationSets, LoopRuntime, extract
from pipeline.crosssim.finetune import ConsistencyFinetuner, finetune_on_labels, linear_probe
from pipeline.crosssim.handlers import DivergenceDetector, ModelSelector
from pipeline.crosssim.losses import AugmentationConsistencyLoss
from pipeline.crosssim.model import AdaptedClassifier, load_model, save_model
from pipeline.crosssim.stage import (
    ADAPTED_MODEL,
    DIAGNOSTICS,
    STUDENT_MODEL,
    AdaptationDivergedError,
    DomainData,
    run_crosssim,
)
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.errors import DatasetError, TrainingError
from pipeline.models import build_model
from pipeline.training.engine import Trainer
from pipeline.training.inference import batched_outputs
from tests.conftest import REPO, copy_kermany_subset, copy_nih_subset

pytestmark = pytest.mark.slow  # adaptation loops on real images: left out of make test-fast

SIZE = 32


@pytest.fixture(scope="module")
def domains(data_dir, tmp_path_factory) -> dict[str, DomainData]:
    """Real images: Kermany train/val (labelled) and NIH (labels hidden), prepared at 32×32."""
    work = tmp_path_factory.mktemp("crosssim")
    kermany = read_dataset(copy_kermany_subset(data_dir, work / "kermany-pediatric", per_class=48))
    nih = read_dataset(copy_nih_subset(data_dir, work / "nih-cxr8", per_class=40))
    source = prepare_dataset(kermany, Preprocessing(SIZE), work / "cache")
    target = prepare_dataset(nih, Preprocessing(SIZE), work / "cache")
    labels = source.manifest["label"].to_numpy(dtype="int64")
    is_train = (source.manifest["split"] != "test").to_numpy()  # official test folder serves as validation here
    return {
        "source_train": DomainData("source-train", np.asarray(source.images[is_train]), labels[is_train]),
        "source_val": DomainData("source-val", np.asarray(source.images[~is_train]), labels[~is_train]),
        "target_train": DomainData("target-train", np.asarray(target.images), np.full(len(target.images), UNLABELLED)),
        "target_labels": DomainData("target-labels", np.asarray(target.images), target.manifest["label"].to_numpy("int64")),
    }


@pytest.fixture(scope="module")
def source_model(domains):
    """A ResNet-18 trained 2 epochs on the Kermany subset: the model CrossSim starts from."""
    cfg = load_config(REPO / "params.yaml", ["train.epochs=2", "train.batch_size=16", "train.early_stopping_patience=null"])
    train, val = domains["source_train"], domains["source_val"]
    trainer = Trainer(build_model("resnet18"), train.images, train.labels, val.images, val.labels, cfg.train, cfg.augment, 0)
    trainer.fit()
    return trainer.model.cpu().to(memory_format=torch.contiguous_format).eval()


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(
        REPO / "params.yaml",
        [
            f"crosssim.output_dir={tmp_path / 'adapt'}",
            "crosssim.batch_size=16",
            "crosssim.steps=30",
            "crosssim.eval_every=10",
            "crosssim.diagnostics_samples=40",
            "crosssim.distill.steps=20",
            *overrides,
        ],
    )


def _run(cfg, source_model, domains, target: DomainData | None = None, selection: DomainData | None = None):
    return run_crosssim(
        source_model,
        SIZE,
        domains["source_train"],
        domains["source_val"],
        target or domains["target_train"],
        cfg,
        show_progress=False,
        target_selection=selection,
    )


def test_gan_alignment_moves_features_and_pushes_the_discriminator_towards_chance(domains, source_model, tmp_path):
    cfg = _cfg(tmp_path, "crosssim.steps=40", "crosssim.consistency_weight=0.01")
    evaluation = EvaluationSets(
        domains["source_val"].images, domains["source_val"].labels, domains["target_train"].images, domains["target_train"].labels
    )

    class Record:
        def __init__(self) -> None:
            self.accuracies: list[float] = []

        def on_step_end(self, loop) -> None:
            self.accuracies.append(loop.state.domain_accuracy)

    def run(adversarial_weight: float) -> tuple[Adapter, list[float]]:
        torch.manual_seed(0)
        record = Record()
        settings = cfg.crosssim.model_copy(update={"adversarial_weight": adversarial_weight})
        runtime = LoopRuntime(torch.device("cpu"), False, None, torch.Generator().manual_seed(0))
        adapter = Adapter(
            source_model, domains["source_train"], domains["target_train"], evaluation, settings, runtime, [record]
        )
        return adapter, record.accuracies

    aligned, opposed = run(1.0)
    target = domains["target_train"].images
    before = extract(aligned.model.features, target, aligned.device, False).clone()
    aligned.fit()
    after = extract(aligned.model.features, target, aligned.device, False)
    assert (after - before).norm(dim=1).mean() > 0.05 * before.norm(dim=1).mean()  # the target extractor moved
    for parameter, original in zip(aligned.frozen_source.parameters(), source_model.features.parameters(), strict=True):
        assert torch.equal(parameter.cpu(), original)  # F_src stays the source model's

    # Same run without the adversarial term: the discriminator, unopposed, learns to tell the domains
    # apart; the target extractor's adversarial loss is what holds its accuracy down towards 0.5.
    unopposed_adapter, unopposed = run(0.0)
    unopposed_adapter.fit()
    late_opposed, late_unopposed = np.mean(opposed[-20:]), np.mean(unopposed[-20:])
    assert late_unopposed > 0.75, late_unopposed
    assert late_opposed < late_unopposed - 0.03, (late_opposed, late_unopposed)


def test_a_step_ignores_gradients_that_earlier_code_left_on_the_model(domains, source_model, tmp_path):
    """The head warm-up leaves gradients on the mapping head; the first adaptation step must not apply them."""
    cfg = _cfg(tmp_path, "crosssim.steps=1", "crosssim.eval_every=1")
    evaluation = EvaluationSets(
        domains["source_val"].images, domains["source_val"].labels, domains["target_train"].images, domains["target_train"].labels
    )

    def one_step(cleared: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        runtime = LoopRuntime(torch.device("cpu"), False, None, torch.Generator().manual_seed(0))
        adapter = Adapter(source_model, domains["source_train"], domains["target_train"], evaluation, cfg.crosssim, runtime)
        assert any(p.grad is not None for p in adapter.model.head.parameters())  # what the warm-up left
        if cleared:
            adapter.optimizer.zero_grad(set_to_none=True)
        adapter.fit()
        return adapter.model.state_dict()

    left, cleared = one_step(cleared=False), one_step(cleared=True)
    assert all(torch.equal(left[name], cleared[name]) for name in left)


def test_adapt_stage_writes_models_and_diagnostics(domains, source_model, tmp_path):
    cfg = _cfg(tmp_path, "crosssim.alignment=dann")
    result = _run(cfg, source_model, domains)
    assert result.adapted_path.name == ADAPTED_MODEL and result.student_path.name == STUDENT_MODEL
    diagnostics = result.diagnostics
    assert set(diagnostics["domain_gap"]) == {"before", "after"}
    assert 0 <= diagnostics["domain_gap"]["after"]["proxy_a_distance"] <= 2
    assert (tmp_path / "adapt" / "tsne_before.png").stat().st_size > 0
    assert (tmp_path / "adapt" / "tsne_after.png").stat().st_size > 0
    steps = [row["step"] for row in diagnostics["adapt"]["history"] if "domain_accuracy" in row]
    assert steps == [10.0, 20.0, 30.0]
    assert diagnostics["adapt"]["selected"]["step"] in (10.0, 20.0, 30.0)  # never the unadapted start
    adapted = load_model(result.adapted_path)
    assert isinstance(adapted, AdaptedClassifier) and adapted.mapping_dim == 256
    student = load_model(result.student_path)
    assert student.backbone_name == cfg.crosssim.distill.student_backbone
    assert student(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, 2)


def test_save_and_load_round_trip_is_exact(source_model, tmp_path):
    model = AdaptedClassifier.from_source(source_model, 256).eval()
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    probe = torch.rand(3, 1, SIZE, SIZE)
    assert torch.equal(model(probe), loaded(probe))
    with pytest.raises(TrainingError, match="not a CrossSim model file"):
        load_model(tmp_path / "missing.pt")


def test_target_batchnorm_takes_the_target_statistics(domains, source_model):
    model = AdaptedClassifier.from_source(source_model, 16).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    stem_norm = model.features.bn1
    before = stem_norm.running_mean.clone()
    recalibrate_batchnorm(model, domains["target_train"].images, torch.device("cpu"), False)
    assert not torch.allclose(before, stem_norm.running_mean)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert not model.training  # its mode is left as it was


def test_non_finite_loss_stops_with_diagnostics_and_no_model(domains, source_model, tmp_path):
    (tmp_path / "adapt").mkdir()
    (tmp_path / "adapt" / ADAPTED_MODEL).write_bytes(b"stale model of an earlier run")
    cfg = _cfg(tmp_path, "crosssim.lr=1e12", "crosssim.discriminator_lr=1e12", "crosssim.distill.enabled=false")
    with pytest.raises(AdaptationDivergedError, match="not finite") as error:
        _run(cfg, source_model, domains)
    assert error.value.exit_code != 0
    assert not (tmp_path / "adapt" / ADAPTED_MODEL).exists()
    assert (tmp_path / "adapt" / DIAGNOSTICS).is_file() and "failure" in error.value.diagnostics_path.read_text()


def test_non_finite_fine_tuning_loss_stops_before_adaptation(domains, source_model, tmp_path, monkeypatch):
    target = domains["target_labels"]
    some_labels = DomainData("target-train", target.images, np.where(np.arange(len(target.labels)) % 3, UNLABELLED, target.labels))
    monkeypatch.setattr(AugmentationConsistencyLoss, "forward", lambda self, weak, strong: (strong * math.nan).mean())
    cfg = _cfg(tmp_path, "crosssim.labelled_fraction=0.3", "crosssim.label_finetune_steps=5")
    with pytest.raises(AdaptationDivergedError, match="label fine-tuning stopped: loss consistency, total is not finite"):
        _run(cfg, source_model, domains, some_labels)
    assert not (tmp_path / "adapt" / ADAPTED_MODEL).exists() and not (tmp_path / "adapt" / STUDENT_MODEL).exists()
    assert "label_finetune" in (tmp_path / "adapt" / DIAGNOSTICS).read_text()


class _Loop:
    def __init__(self) -> None:
        self.state = type("State", (), {"domain_accuracy": math.nan, "stop_reason": None, "step": 0, "evaluation": {}})()
        self.model = torch.nn.Linear(1, 1)


def test_balanced_batches_hold_both_classes_equally_and_plain_ones_cover_every_image():
    labels = np.array([1] * 90 + [0] * 10)
    data = DomainData("src", np.zeros((100, 4, 4), dtype=np.uint8), labels)
    balanced = DomainBatches(data, 32, torch.Generator().manual_seed(0), balanced=True)
    for _ in range(5):
        assert torch.bincount(balanced.next()[1]).tolist() == [16, 16]
    plain = DomainBatches(DomainData("src", np.arange(100, dtype=np.uint8).reshape(100, 1, 1), labels), 25, torch.Generator())
    seen = torch.cat([plain.next()[0].flatten() for _ in range(4)])
    assert sorted(seen.tolist()) == list(range(100))
    with pytest.raises(TrainingError, match="every image labelled"):
        DomainBatches(DomainData("tgt", data.images, np.full(100, UNLABELLED)), 32, torch.Generator(), balanced=True)


def test_discriminator_collapse_is_detected_after_patience_windows():
    detector, loop = DivergenceDetector(patience=2), _Loop()
    for window, accuracy in enumerate([1.0, 0.7, 1.0, 0.995, 1.0]):
        for _ in range(5):
            loop.state.domain_accuracy = accuracy
            detector.on_step_end(loop)
        loop.state.step = 5 * (window + 1)
        detector.on_evaluate(loop)
        if window < 3:
            assert loop.state.stop_reason is None  # a single collapsed window, or an interrupted streak
    assert "discriminator collapse" in loop.state.stop_reason


def test_selection_rule_gates_on_source_then_prefers_low_target_entropy():
    selector, loop = ModelSelector(tolerance=0.02), _Loop()
    evaluations = [
        {"step": 0, "source_val_auc": 0.95, "target_entropy": 0.1},
        {"step": 10, "source_val_auc": 0.90, "target_entropy": 0.01},  # confident but forgot the source: gated
        {"step": 20, "source_val_auc": 0.94, "target_entropy": 0.30},
        {"step": 30, "source_val_auc": 0.94, "target_entropy": 0.20},
    ]
    for evaluation in evaluations:
        loop.state.evaluation = evaluation
        selector.on_evaluate(loop)
    assert selector.best["step"] == 30
    labelled = ModelSelector(tolerance=0.02)
    for evaluation in [
        {"step": 0, "source_val_auc": 0.95, "target_entropy": 0.1},
        {"step": 10, "source_val_auc": 0.95, "target_entropy": 0.1, "target_labelled_auc": 0.8},
        {"step": 20, "source_val_auc": 0.95, "target_entropy": 0.05, "target_labelled_auc": 0.7},
    ]:
        loop.state.evaluation = evaluation
        labelled.on_evaluate(loop)
    assert labelled.best["step"] == 10  # labelled target AUC wins over entropy when labels exist

    saturated = ModelSelector(tolerance=0.02)
    for evaluation in [
        {"step": 0, "source_val_auc": 0.95, "target_entropy": 0.1, "target_labelled_auc": 1.0},
        {"step": 10, "source_val_auc": 0.95, "target_entropy": 0.2, "target_labelled_auc": 1.0},
        {"step": 20, "source_val_auc": 0.70, "target_entropy": 0.1, "target_labelled_auc": 1.0},
    ]:
        loop.state.evaluation = evaluation
        saturated.on_evaluate(loop)
    # with target labels there is no source gate; trained-on labels saturate, entropy breaks the tie
    assert saturated.best["step"] == 20


def test_with_target_labels_adaptation_starts_from_the_fine_tuned_model(domains, source_model, tmp_path):
    target = domains["target_labels"]
    rng = np.random.default_rng(0)
    hidden = rng.random(len(target.labels)) > 0.3
    some_labels = DomainData("target-train", target.images, np.where(hidden, UNLABELLED, target.labels))
    cfg = _cfg(
        tmp_path, "crosssim.labelled_fraction=0.3", "crosssim.label_finetune_steps=5", "crosssim.steps=10", "crosssim.distill.steps=5"
    )
    result = _run(cfg, source_model, domains, some_labels)
    finetune = result.diagnostics["label_finetune"]
    assert {key: finetune[key] for key in ("labelled_images", "steps", "consistency_weight")} == {
        "labelled_images": int((~hidden).sum()),
        "steps": 5,
        "consistency_weight": 1.0,  # semi-supervised: the other target-train images through consistency
    }
    # evaluated before and after (source-val AUC, labelled-target AUC); its losses are logged every 10 steps
    assert [row["step"] for row in finetune["history"]] == [0.0, 5.0]
    assert "eval.target_labelled_auc" in finetune["history"][-1]
    assert "max labelled-target AUC" in result.diagnostics["selection_rule"]
    assert "target_labelled_auc" in result.diagnostics["adapt"]["selected"]
    before = [p.clone() for p in source_model.parameters()]
    fine_tuned = finetune_on_labels(source_model, some_labels, 5, 3e-4, cfg.train, cfg.augment, cfg.seed)
    assert all(torch.equal(a, b) for a, b in zip(before, source_model.parameters(), strict=True))  # a copy moved
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, fine_tuned.parameters(), strict=True))
    evaluation = EvaluationSets(domains["source_val"].images, domains["source_val"].labels, target.images, some_labels.labels)
    runtime = LoopRuntime(torch.device("cpu"), False, None, torch.Generator().manual_seed(0))
    weights = {
        name: Adapter(fine_tuned, domains["source_train"], data, evaluation, cfg.crosssim, runtime).source_weight
        for name, data in (("labelled", some_labels), ("unlabelled", domains["target_train"]))
    }
    assert weights == {"labelled": 0.0, "unlabelled": 1.0}  # source hard labels step back only when target ones exist
    with pytest.raises(DatasetError, match="both classes"):
        one_class = DomainData("target-train", target.images[:6], np.array([1, 1, 1, UNLABELLED, UNLABELLED, UNLABELLED]))
        finetune_on_labels(source_model, one_class, 5, 3e-4, cfg.train, cfg.augment, cfg.seed)


def _semi_supervised(domains, seed: int) -> tuple[DomainData, EvaluationSets, LoopRuntime]:
    """NIH target-train with about 30% of its labels kept, its evaluation sets, a CPU runtime."""
    target = domains["target_labels"]
    hidden = np.random.default_rng(seed).random(len(target.labels)) > 0.3
    some_labels = DomainData("target-train", target.images, np.where(hidden, UNLABELLED, target.labels))
    evaluation = EvaluationSets(domains["source_val"].images, domains["source_val"].labels, target.images, some_labels.labels)
    return some_labels, evaluation, LoopRuntime(torch.device("cpu"), False, None, torch.Generator().manual_seed(0))


def test_semi_supervised_fine_tuning_learns_consistency_on_the_unlabelled_target_images(domains, source_model, tmp_path):
    cfg = _cfg(tmp_path)
    target = domains["target_labels"]
    some_labels, evaluation, runtime = _semi_supervised(domains, seed=1)
    settings = cfg.crosssim.model_copy(update={"label_consistency_weight": 2.0, "label_finetune_steps": 4})
    loop = ConsistencyFinetuner(source_model, some_labels, settings, cfg.train, cfg.augment, evaluation, runtime)
    before = [p.clone() for p in source_model.parameters()]
    loop.fit()
    assert loop.state.step == 4 and set(loop.state.losses) == {"classification", "consistency", "total"}
    assert loop.state.losses["consistency"] > 0  # weak and strong views disagree
    assert loop.state.losses["total"] == pytest.approx(loop.state.losses["classification"] + loop.state.losses["consistency"])
    assert all(torch.equal(a, b) for a, b in zip(before, source_model.parameters(), strict=True))  # a copy moved
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.model.parameters(), strict=True))

    with pytest.raises(DatasetError, match="needs unlabelled images too"):
        ConsistencyFinetuner(source_model, target, settings, cfg.train, cfg.augment, evaluation, runtime)
    one_class = DomainData("target-train", target.images[:6], np.array([0, 0, UNLABELLED, UNLABELLED, UNLABELLED, UNLABELLED]))
    with pytest.raises(DatasetError, match="both classes"):
        ConsistencyFinetuner(source_model, one_class, settings, cfg.train, cfg.augment, evaluation, runtime)


def test_adamatch_fine_tuning_keeps_a_share_of_distribution_aligned_pseudo_labels(domains, source_model, tmp_path):
    cfg = _cfg(tmp_path)
    some_labels, evaluation, runtime = _semi_supervised(domains, seed=2)
    settings = cfg.crosssim.model_copy(update={"label_consistency": "adamatch", "label_finetune_steps": 4})
    loop = ConsistencyFinetuner(source_model, some_labels, settings, cfg.train, cfg.augment, evaluation, runtime)
    loop.fit()
    assert set(loop.state.losses) == {"classification", "consistency", "pseudo_labels_kept", "total"}
    assert 0.0 <= loop.state.losses["pseudo_labels_kept"] <= 1.0  # recorded, not minimised:
    assert loop.state.losses["total"] == pytest.approx(loop.state.losses["classification"] + loop.state.losses["consistency"])


def test_linear_probe_fits_only_the_head_then_lp_ft_runs_in_the_stage(domains, source_model, tmp_path):
    target = domains["target_labels"]
    hidden = np.random.default_rng(3).random(len(target.labels)) > 0.5
    some_labels = DomainData("target-train", target.images, np.where(hidden, UNLABELLED, target.labels))
    cfg = _cfg(tmp_path)
    probed = linear_probe(source_model, some_labels, 100, 1e-2, cfg.train, torch.device("cpu"))
    source_state, probed_state = source_model.state_dict(), probed.state_dict()
    changed = {name for name in source_state if not torch.equal(source_state[name], probed_state[name])}
    assert changed == {"head.weight", "head.bias"}  # the features (and their BatchNorm statistics) are frozen

    def labelled_loss(model) -> float:
        logits = torch.cat(list(batched_outputs(model.eval(), target.images[~hidden], torch.device("cpu"), False)))
        return float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(target.labels[~hidden])))

    assert labelled_loss(probed) < labelled_loss(source_model)  # the head now fits the target labels better
    cfg = _cfg(tmp_path, "crosssim.labelled_fraction=0.5", "crosssim.label_probe_steps=20", "crosssim.label_finetune_steps=3",
               "crosssim.label_consistency=adamatch", "crosssim.steps=4", "crosssim.distill.enabled=false")  # fmt: skip
    finetune = _run(cfg, source_model, domains, some_labels).diagnostics["label_finetune"]
    assert (finetune["probe_steps"], finetune["steps"], finetune["consistency"]) == (20, 3, "adamatch")


def test_the_deployable_model_is_the_one_scoring_higher_on_held_out_labelled_target_images(domains, source_model, tmp_path):
    target = domains["target_labels"]
    held = np.arange(len(target.labels)) % 4 == 0
    selection = DomainData("target-selection", target.images[held], target.labels[held])
    training = DomainData("target-train", target.images, np.where(held | (np.arange(len(held)) % 2 == 1), UNLABELLED, target.labels))
    cfg = _cfg(tmp_path, "crosssim.labelled_fraction=0.3", "crosssim.label_finetune_steps=3", "crosssim.steps=4")
    result = _run(cfg, source_model, domains, training, selection)
    chosen = result.diagnostics["deployable"]
    aucs = chosen["auc"]
    assert chosen["model"] == result.deployable == ("student" if aucs["student"] > aucs["adapted"] else "adapted")
    assert result.deployable_path == (result.student_path if result.deployable == "student" else result.adapted_path)
    assert "target-selection" in chosen["chosen_on"]
    unjudged = _run(_cfg(tmp_path, "crosssim.steps=4", "crosssim.distill.steps=2"), source_model, domains)
    assert (unjudged.deployable, unjudged.diagnostics["deployable"]["chosen_on"]) == ("adapted", "no held-out labelled target images")


def test_bad_inputs_are_refused_before_anything_is_written(domains, source_model, tmp_path):
    cfg = _cfg(tmp_path)
    target = domains["target_train"]
    empty = DomainData("target-train", target.images[:0], target.labels[:0])
    with pytest.raises(DatasetError, match="target-train: no images"):
        _run(cfg, source_model, domains, empty)

    one_class = DomainData("target-train", target.images, np.where(np.arange(len(target.images)) < 10, 1, UNLABELLED))
    with pytest.raises(DatasetError, match="both classes"):
        _run(_cfg(tmp_path, "crosssim.labelled_fraction=0.1"), source_model, domains, one_class)

    larger = DomainData("target-train", np.zeros((8, 48, 48), np.uint8), np.full(8, UNLABELLED))
    with pytest.raises(DatasetError, match="48×48 but the source model was trained on 32×32"):
        _run(cfg, source_model, domains, larger)

    rgb = DomainData("target-train", np.zeros((8, SIZE, SIZE, 3), np.uint8), np.full(8, UNLABELLED))
    with pytest.raises(DatasetError, match="single-channel uint8"):
        _run(cfg, source_model, domains, rgb)

    rgb_model = build_model("resnet18")
    rgb_model.features.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)  # expects RGB input
    with pytest.raises(TrainingError, match="does not accept 1×32×32 images"):
        _run(cfg, rgb_model, domains)
    assert not (tmp_path / "adapt").exists()
