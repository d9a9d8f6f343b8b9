"""One typed configuration for every stage, loaded from ``params.yaml``.

The same file is read by the CLI, the Prefect flows and ``dvc.yaml`` (DVC reads its
keys as stage params), so a run is fully described by it plus ``--set key=value``
overrides. Relative paths are resolved against the folder of the config file (the
project root), so a run does not depend on the directory it was started from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data.preprocessing import Harmonisation, Preprocessing
from pipeline.errors import ConfigError

DATA_DIR_ENV = "CROSSSIM_DATA_DIR"
DEFAULT_DATA_DIR = "data/raw"
PRETRAIN_WEIGHTS = "pretrain"  # train.pretrained_weights: the pretrain stage's backbone, not a file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off`` as False: take it as the word the user wrote."""
    return "off" if value is False else value


class DataConfig(_Section):
    """Where the datasets are and how they become model inputs."""

    root: Path | None = Field(
        default=None,
        description=f"Folder holding one sub-folder per dataset; default ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR}.",
    )
    source: str = "kermany-pediatric"
    external: list[str] = Field(default_factory=lambda: ["nih-cxr8"])
    image_size: int = Field(default=64, ge=16, le=1024)
    harmonisation: Harmonisation = Field(
        default="histeq",
        description="Per-image intensity standardisation after the resize: none, histeq (global histogram "
        "equalisation) or clahe; applied in prepare and carried by the served model.",
    )
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    max_images_per_class: int | None = Field(
        default=None, ge=1, description="Subsample each split/class to at most this many (quick runs, tests)."
    )
    cache_dir: Path = Path(".cache/prepared")
    prepared_dir: Path = Path("outputs/prepared")

    def resolved_root(self) -> Path:
        """``root`` if set, else $CROSSSIM_DATA_DIR, else ``data/raw``."""
        if self.root is not None:
            return self.root
        return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))

    def preprocessing(self) -> Preprocessing:
        """What turns a decoded image into this configuration's model input (prepare and serving)."""
        return Preprocessing(self.image_size, self.harmonisation)

    def prepared_site(self, site: str) -> Path:
        """Where ``crosssim prepare`` publishes ``site``'s prepared images."""
        return self.prepared_dir / site


class ValidationConfig(_Section):
    """Thresholds of the data-quality rules (see pipeline.validation)."""

    min_side: int = Field(
        default=28, ge=1, description="Smaller images fail validation; 28 admits PneumoniaMNIST's official 28×28 images."
    )
    max_side: int = Field(default=8192, ge=1)
    min_std: float = Field(default=2.0, ge=0, description="Below this pixel std an image counts as blank/constant.")
    min_images: int = Field(default=50, ge=1)
    min_class_share: float = Field(default=0.1, ge=0, le=0.5)
    allowed_labels: list[int] = Field(default_factory=lambda: [0, 1])
    drop_exact_duplicates: bool = Field(
        default=True, description="Drop same-split, same-label exact copies (reported) before the rules run."
    )
    report_dir: Path = Path("outputs/validation")


class AugmentConfig(_Section):
    """Dynamic augmentation applied on batched tensors during training."""

    enabled: bool = True
    rotation_degrees: float = Field(default=15.0, ge=0, le=180)
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.0, ge=0, le=1)
    scale: tuple[float, float] | None = None
    translate: float = Field(default=0.0, ge=0, le=0.5)
    hflip: bool = False


Backbone = Literal["resnet18", "resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0"]


class TrainConfig(_Section):
    backbone: Backbone = "resnet18"
    pretrained_weights: Literal["pretrain"] | Path | None = Field(
        default=None,
        description="Local torchvision state_dict file (never downloaded), or `pretrain`: the backbone the pretrain "
        "stage made for this configuration (./pretrain names a file called pretrain).",
    )
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.05, ge=0, lt=1)
    class_weighted: bool = True
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    grad_accum_steps: int = Field(default=1, ge=1)
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Exponential moving average of the weights (and BatchNorm statistics) at this decay, warmed up "
        "as min(decay, (1+n)/(10+n)) after n steps; validated, checkpointed and deployed instead of the raw "
        "weights. null: off.",
    )
    early_stopping_patience: int | None = Field(default=4, ge=1)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    device: str = Field(default="auto", description="auto (cuda when present, else cpu), or cpu, cuda, cuda:N, mps.")
    num_threads: int | None = Field(default=None, ge=1)
    processes: int = Field(
        default=1,
        ge=1,
        description="Data-parallel training processes on this machine (one per GPU, or CPU processes); "
        "batch_size is their global batch. Under torchrun its --nproc-per-node decides instead.",
    )
    output_dir: Path = Path("outputs/train")
    resume: bool = False

    _off_words = field_validator("amp", "channels_last", mode="before")(_yaml_off)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        if value in ("auto", "cpu"):
            return value  # no torch import: commands that never train load the config fast
        _check_device(value)
        return value


def _check_device(name: str) -> None:
    """Raise ValueError unless ``name`` is a torch device string whose device this machine has."""
    import torch  # only for a device other than auto/cpu (~10 s to import)

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{name!r} is not a torch device ({exc}); use auto, cpu, cuda, cuda:N or mps") from exc
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"{name!r}: this machine has no {device.type} device; use auto (cuda when present, else cpu)")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{name!r}: this machine has {count} {device.type} device(s), numbered from 0")


class PretrainConfig(_Section):
    """Self-supervised pretraining of ``train.backbone`` (``crosssim pretrain``, pipeline.pretrain) on every unlabelled
    image a run may train on: the source site's train split and, with CrossSim, the target's target-train split.
    Never source val/test, target-test or another external site: those are evaluation sets.

    Sized for a 2-core CPU: with the defaults (SimCLR, resnet18, 64 px, batch 128) one epoch over the full Kermany
    train split and NIH target-train (4,470 + 461 images) took 101 s there (one epoch measured), so the default 10
    epochs take about 17 min. The backbone is cached by content: an unchanged rerun reuses it at no cost.
    """

    method: Literal["simclr", "byol"] = Field(
        default="simclr", description="simclr: NT-Xent over in-batch negatives; byol: prediction of a momentum encoder."
    )
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=2, description="Images per step (two views each); SimCLR's negatives.")
    lr: float = Field(default=1e-3, gt=0, description="AdamW, one warm-up epoch then cosine decay.")
    weight_decay: float = Field(default=1e-4, ge=0)
    temperature: float = Field(
        default=0.5, gt=0, description="τ of SimCLR's NT-Xent loss; 0.5 (lightly's default) is stable at CPU-sized batches."
    )
    projection_dim: int = Field(default=128, ge=2, description="Output width of the projection head.")
    hidden_dim: int = Field(default=512, ge=2, description="Hidden width of the projection (and BYOL prediction) head.")
    momentum: float = Field(
        default=0.99, ge=0, lt=1, description="BYOL: the momentum encoder's EMA rate at the start (cosine to 1)."
    )
    min_crop_scale: float = Field(
        default=0.4, gt=0, le=1, description="Each view is a random crop of at least this share of the image's area."
    )
    cache_dir: Path = Path(".cache/pretrain")
    output_dir: Path = Path("outputs/pretrain")


class EvaluateConfig(_Section):
    bootstrap_samples: int = Field(default=1000, ge=0)
    calibration_bins: int = Field(default=10, ge=2)
    output_dir: Path = Path("outputs/eval")


class DistillConfig(_Section):
    """Teacher (the adapted model) → student: L = α·CE(y, s) + (1 − α)·T²·KL(t ‖ s)."""

    enabled: bool = True
    student_backbone: Backbone = "mobilenet_v3_small"
    alpha: float = Field(default=0.7, ge=0, le=1)
    temperature: float = Field(default=2.0, gt=0)
    pseudo_label_threshold: float | None = Field(
        default=None, gt=0, le=1, description="Confident teacher labels on unlabelled target images (off: null)."
    )
    steps: int = Field(default=600, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    grad_clip_norm: float | None = Field(default=5.0, gt=0, description="Gradient-norm clip (null: none).")


class CrossSimConfig(_Section):
    """Adaptation of the source model to the target hospital (pipeline.crosssim); each part switchable."""

    enabled: bool = True
    target: str = Field(default="nih-cxr8", description="Target site; must be one of data.external.")
    test_set: Path | None = Field(
        default=None, description="Folder of held-out target patients (any reader layout); null: hold out test_fraction."
    )
    test_fraction: float = Field(default=0.3, gt=0, lt=1)
    labelled_fraction: float = Field(default=0.0, ge=0, le=1, description="Share of target-train patients with labels.")
    label_finetune_steps: int = Field(
        default=150, ge=0, description="With target labels: fine-tune on them first, adapt from that model (0: off)."
    )
    label_consistency_weight: float = Field(
        default=1.0,
        ge=0,
        description="In that fine-tuning: weak→strong augmentation consistency on unlabelled target images (0: off).",
    )
    label_consistency: Literal["uda", "adamatch"] = Field(
        default="uda",
        description="That consistency's form: uda (KL to the weak view's prediction) or adamatch (hard pseudo-labels of "
        "the weak view, distribution-aligned to the labelled images' predictions, kept above a relative confidence).",
    )
    relative_confidence: float = Field(
        default=0.9, gt=0, le=1, description="adamatch: a pseudo-label counts above this × the labelled batch's mean confidence."
    )
    selection_fraction: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="With target labels: share of the labelled patients held out of training (their images stay, "
        "unlabelled) to choose the deployable model between teacher and student (0: none held out; the teacher deploys).",
    )
    label_probe_steps: int = Field(
        default=0,
        ge=0,
        description="LP-FT: with target labels, first fit only the classifier head on the frozen features of the labelled "
        "images for this many full-batch steps (head_warmup_lr), then fine-tune every layer (0: straight fine-tuning).",
    )
    source_label_weight: float = Field(
        default=0.0, ge=0, le=1, description="Weight of the source hard labels when target labels exist (1 without them)."
    )
    alignment: Literal["gan", "dann", "off"] = "gan"
    balance_source_classes: bool = Field(
        default=True, description="Adaptation's source batches hold both classes equally (the domains' mixes differ)."
    )
    adversarial_weight: float = Field(default=1.0, ge=0)
    consistency_weight: float = Field(default=0.1, ge=0, description="λ of ‖F_src(x_t) − F_tgt(x_t)‖₂.")
    mapping_dim: int = Field(default=256, ge=2)
    target_batchnorm: bool = Field(
        default=True, description="Re-estimate BatchNorm statistics on target-train images after adaptation (AdaBN)."
    )
    augment: bool = Field(default=True, description="Dynamic augmentation (the augment section) on both domains.")
    steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=32, ge=2, description="Images per domain per step.")
    lr: float = Field(default=3e-4, gt=0, description="Backbone; the mapping head and classifier get head_lr_factor× it.")
    head_lr_factor: float = Field(
        default=10.0, gt=0, description="The new head learns this much faster than the copied backbone (TLlib's convention)."
    )
    discriminator_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay of the adaptation.")
    grad_clip_norm: float | None = Field(default=5.0, gt=0, description="Adaptation's gradient-norm clip (null: none).")
    head_warmup_steps: int = Field(
        default=300, ge=0, description="Steps fitting the new mapping head + classifier on frozen features first."
    )
    head_warmup_lr: float = Field(default=1e-3, gt=0)
    label_finetune_lr: float = Field(default=3e-4, gt=0, description="Learning rate of the fine-tuning on target labels.")
    eval_every: int = Field(default=100, ge=1)
    selection_tolerance: float = Field(
        default=0.02, ge=0, description="Candidates keep source-val AUC within this of the source model's."
    )
    collapse_patience: int = Field(default=3, ge=1, description="Evaluations in a row with discriminator collapse → stop.")
    diagnostics_samples: int = Field(default=300, ge=10, description="Images per domain for PAD and t-SNE.")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    output_dir: Path = Path("outputs/adapt")

    _off_words = field_validator("alignment", mode="before")(_yaml_off)


class TrackingConfig(_Section):
    experiment: str = "crosssim-retrain"
    tracking_uri: str | None = Field(default=None, description="Default: $MLFLOW_TRACKING_URI, else sqlite under mlflow/.")
    local_dir: Path = Path("mlflow")


class RegistryConfig(_Section):
    """Registration of each run's model as ``challenger`` and its promotion to ``champion`` (pipeline.registry)."""

    enabled: bool = True
    model_name: str = Field(default="crosssim-pneumonia", min_length=1, description="Registered model; the student: <name>-student.")
    policy: Literal["auto", "review"] = Field(
        default="review", description="auto: the gate promotes; review: the gate recommends, a reviewer decides."
    )
    margin: float = Field(default=0.02, ge=0, le=1, description="Allowed drop vs the champion, per set and metric.")
    specificity: float = Field(default=0.8, gt=0, lt=1, description="Operating point for the gate's sensitivity.")
    floor_auc: float = Field(default=0.6, ge=0, le=1, description="A first champion needs at least this AUC on every set.")
    floor_sensitivity: float = Field(
        default=0.5, ge=0, le=1, description="…and at least this sensitivity at the gate's specificity on every set."
    )


class IngestConfig(_Section):
    """Weekly hospital batches (``crosssim ingest SITE FOLDER``): where they land and what stops them."""

    data_dir: Path = Field(
        default=Path("data/raw"),
        description="Sites' folders, inside dvc_target. Not data.root: a batch must land in the DVC-tracked copy, "
        "never in a folder $CROSSSIM_DATA_DIR happens to point at.",
    )
    dvc_target: Path = Field(
        default=Path("data"), description="Folder tracked by `dvc add`; its .dvc file holds the data version."
    )
    remote: str | None = Field(default=None, description="DVC remote to push to; null: the repository's default.")
    push: bool = True
    quarantine_dir: Path = Path("quarantine")
    report_dir: Path = Path("outputs/ingest")
    log_path: Path = Field(default=Path("ingest_log.jsonl"), description="Append-only; commit it with the .dvc file.")
    salt_env: str = Field(
        default="CROSSSIM_DICOM_SALT",
        pattern=r"^[A-Z][A-Z0-9_]*$",
        description="DICOM pseudonym secret: $<salt_env>_<SITE>, else $<salt_env>; never in this file.",
    )
    allow_known_patients: bool = Field(
        default=False, description="Accept images of patients the site already has (follow-ups); default blocks them."
    )
    min_batch_images: int = Field(default=1, ge=1, description="validation.min_images, for one batch.")
    retrain_after: bool = Field(
        default=True, description="The ingest flow runs the retraining flow (train, CrossSim, registry) on an accepted batch."
    )


class ScheduleConfig(_Section):
    """When the retraining runs by itself, as served by ``crosssim serve-flows`` (flows/deployments.py)."""

    retrain_cron: str = Field(
        default="0 2 * * 1", description="Cron of the scheduled retraining (default: Mondays 02:00); checked by Prefect."
    )
    timezone: str = Field(default="UTC", description="IANA zone the cron is read in; daylight-saving shifts are followed.")
    active: bool = Field(default=True, description="false: the schedule is registered but off; runs only on demand.")
    max_concurrent_runs: int = Field(
        default=1,
        ge=1,
        description="Flow runs the serving process executes at once (each in its own run folder; they share the cores).",
    )
    work_pool: str = Field(
        default="process",
        min_length=1,
        description="The Prefect work pool `crosssim deploy` puts the deployments on; missing, it is created as a "
        "process pool (a Kubernetes pool is created from infra/prefect/kubernetes-base-job-template.json).",
    )
    heartbeat_seconds: int = Field(
        default=30, ge=30, description="Flow runs of a process pool created by `crosssim deploy` report alive this often."
    )
    crashed_after_seconds: int = Field(
        default=90,
        ge=60,
        description="A flow run silent this long (its worker or machine was lost) is marked Crashed by the automation "
        "`crosssim deploy` creates; `prefect flow-run retry` then resumes it.",
    )

    @model_validator(mode="after")
    def _silence_outlasts_heartbeats(self) -> ScheduleConfig:
        if self.crashed_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"crashed_after_seconds ({self.crashed_after_seconds}) must be at least two heartbeats "
                f"(2 × heartbeat_seconds = {2 * self.heartbeat_seconds}): one late heartbeat must not crash a run"
            )
        return self

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r} (e.g. UTC, Europe/Berlin)") from exc
        return value


class ExportConfig(_Section):
    """Deployable artifacts built at registration (pipeline.serving): ONNX FP32 and static INT8."""

    enabled: bool = True
    parity_tolerance: float = Field(
        default=1e-4, gt=0, description="Max |p_onnx − p_torch| on the golden images for the FP32 export to be kept."
    )
    golden_images: int = Field(default=64, ge=2, description="Real source-test images of the frozen golden set.")
    int8: bool = Field(default=True, description="Also build the static INT8 (QDQ, per-channel) version.")
    calibration_images: int = Field(
        default=256, ge=8, description="Real source-val + target-train images that calibrate the INT8 ranges."
    )
    int8_auc_tolerance: float = Field(
        default=0.005, ge=0, description="INT8 is kept only if its AUC is within this of the PyTorch model's on every gate set."
    )


class ServeConfig(_Section):
    """``crosssim serve``: the registry's model behind a FastAPI app on ONNX Runtime (pipeline.serving)."""

    model_name: str | None = Field(default=None, description="Registered model to serve; null: registry.model_name.")
    alias: str = Field(default="champion", min_length=1, description="Alias to follow (moves are picked up live).")
    version: str | None = Field(default=None, description="Pin a version instead of following the alias.")
    precision: Literal["fp32", "int8"] = "fp32"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_batch: int = Field(default=16, ge=1, description="Requests ONNX Runtime scores in one call (micro-batching).")
    max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long a batch waits for more requests; 0: it starts at once, and requests arriving "
        "while one is scored form the next.",
    )
    decode_threads: int = Field(default=0, ge=0, description="Threads decoding uploads; 0: one per CPU core.")
    inference_threads: int = Field(
        default=1, ge=0, description="ONNX Runtime threads per batch; 0: every core (leaves none to decoding)."
    )
    poll_seconds: float = Field(default=10.0, gt=0, description="How often the alias is checked for a move.")
    max_upload_mb: float = Field(default=20.0, gt=0, description="Larger request bodies are refused (413).")
    min_side: int = Field(default=64, ge=1, description="Smaller images are refused (422).")
    max_side: int = Field(default=8192, ge=1, description="Larger images are refused before decoding (422).")
    sites: list[str] = Field(
        default_factory=list, description="Sites a request may name; empty: data.source and data.external."
    )
    ledger_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the prediction ledger; null: $CROSSSIM_LEDGER_URL, else SQLite under outputs/."
    )
    ledger_path: Path = Field(default=Path("outputs/serve/ledger.db"), description="The default SQLite ledger (WAL).")
    image_store: Path = Field(default=Path("outputs/serve/images"), description="De-identified served images, by inference_id.")
    image_retention_days: int = Field(default=90, ge=0, description="Served images older than this are deleted (0: keep none).")
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("version", mode="before")
    @classmethod
    def _version_number_as_text(cls, value: Any) -> Any:
        """``--set serve.version=3`` parses as a number; registry versions are strings."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RolloutConfig(_Section):
    """Continuous-learning A/B rollouts of the challenger against the champion (pipeline.rollout)."""

    policy: Literal["auto", "review"] = Field(
        default="review", description="auto: the analysis promotes / rolls back; review: it recommends, a reviewer decides."
    )
    canary_schedule: list[float] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5],
        min_length=1,
        description="The challenger's share of patients at each canary stage, in the order the rollout ramps.",
    )
    outcome_sources: list[str] = Field(
        default_factory=lambda: ["radiologist_read", "follow_up"],
        min_length=1,
        description="Who may label a served case, highest precedence first: it settles labels that disagree.",
    )
    maturity_hours: float = Field(
        default=72.0, ge=0, description="A label counts once it is this old (later corrections may still arrive)."
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="Error rate of the sequential decision rule, checked any time.")
    min_labelled: int = Field(default=30, ge=1, description="No decision before this many labelled cases.")
    sensitivity_margin: float = Field(
        default=0.05, ge=0, lt=1,
        description="Promotion needs the challenger's sensitivity, read at the champion's specificity, at most this far below, per site.",
    )
    min_site_positives: int = Field(
        default=20, ge=1, description="A site's sensitivity is judged once it has this many labelled pneumonia cases."
    )
    drift_window: int = Field(default=200, ge=10, description="Latest served images per site a drift check looks at.")
    drift_min_window: int = Field(default=50, ge=10, description="No drift check on fewer served images.")
    drift_alpha: float = Field(
        default=0.001, gt=0, lt=0.5, description="A drift test alarms below this p-value (checked every analysis)."
    )
    auto_start: bool = Field(
        default=False, description="A challenger registered by retraining starts a shadow rollout against the champion."
    )
    analysis_cron: str = Field(
        default="0 * * * *", description="When the rollout-analysis deployment runs (in schedule.timezone)."
    )

    @field_validator("canary_schedule")
    @classmethod
    def _ramping_shares(cls, value: list[float]) -> list[float]:
        if any(not 0 < share <= 1 for share in value) or value != sorted(set(value)):
            raise ValueError("canary_schedule: increasing shares in (0, 1], e.g. [0.05, 0.25, 0.5]")
        return value

    @field_validator("outcome_sources")
    @classmethod
    def _distinct_sources(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not all(source.strip() for source in value):
            raise ValueError("outcome_sources: distinct, non-empty names, highest precedence first")
        return value


# Batch active-learning strategies of the read worklist (pipeline.loop.selection documents each and its source)
WorklistStrategy = Literal["random", "uncertainty", "diverse", "hybrid"]


class LoopConfig(_Section):
    """The learning loop: which served cases a radiologist is asked to read, and each site's operating point
    chosen on them (pipeline.loop)."""

    worklist_strategy: WorklistStrategy = Field(
        default="uncertainty",
        description="How the read worklist ranks a site's unlabelled served cases (make bench-loop: uncertainty taught "
        "most, reaching random's AUC with half its reads).",
    )
    worklist_window_days: float = Field(
        default=7.0, gt=0,
        description="Only cases served this recently are candidates: a weekly worklist reads the week's studies, which "
        "a running rollout has scored with both models (its evidence).",
    )
    hybrid_pool_factor: float = Field(
        default=1.5, ge=1,
        description="hybrid: k-center picks the batch among this many × budget most uncertain cases (at 4 a weekly "
        "worklist of 30 among 60 studies took every study into the pool: hybrid was diverse).",
    )
    retrain_steps: int = Field(
        default=100, ge=1, description="Warm-start retraining: optimiser steps on the site's labelled cases (batch train.batch_size)."
    )
    retrain_lr: float = Field(default=3e-4, gt=0, description="Warm-start retraining's learning rate (cosine decay, no warm-up).")
    source_replay: float = Field(
        default=0.0, ge=0, description="Source images mixed in per labelled site case (0: the site's reads alone)."
    )
    calibration_share: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of the reads (per class) held out of warm-start fine-tuning to fit its temperature and "
        "choose its threshold out of sample (0: none; make bench-loop at 0.25: calibrated challengers, but 0.03 less "
        "AUC from the reads left out, and still no promotion in 7 weeks; pipeline/loop/retrain.py).",
    )
    site_sensitivity_target: float = Field(
        default=0.9, gt=0, lt=1,
        description="A site's own operating point (crosssim registry site-threshold): the highest threshold at which "
        "its matured reads reach this sensitivity (the source's threshold does not transfer across the shift).",
    )
    min_threshold_reads: int = Field(
        default=40, ge=1, description="Matured labelled reads of the site, scored by the version, before its threshold is chosen."
    )
    min_threshold_class_reads: int = Field(
        default=10, ge=1, description="Of those, at least this many of each class (pneumonia and normal)."
    )
    registry_gate: bool = Field(
        default=True,
        description="true: a loop challenger must pass the registry's promotion gate (frozen sets, point estimates) "
        "before its shadow rollout; false: the gate's scores go into its card only and the rollout's sequential rule "
        "on the site's own outcomes alone decides.",
    )
    sites: list[str] = Field(
        default_factory=lambda: ["nih-cxr8"],
        description="The sites the continuous-learning deployment runs a weekly cycle for (one deployment each).",
    )
    cycle_cron: str = Field(
        default="0 3 * * 1",
        description="When each site's cycle runs (crosssim serve-flows / deploy), in schedule.timezone: weekly.",
    )
    exports_dir: Path = Field(
        default=Path("outputs/loop/exports"),
        description="Where a cycle's exported reads wait, per site, until ingested (then in ingested/ or rejected/).",
    )


class RunsConfig(_Section):
    """Where each flow run (``crosssim run``, a deployment) keeps its own outputs."""

    dir: Path = Field(
        default=Path("outputs/runs"),
        description="One sub-folder per flow run: concurrent runs never read or overwrite each other's files.",
    )


# A flow run's outputs inside its run folder (the CLI stages and dvc.yaml keep the configured paths).
RUN_FOLDER_LAYOUT = (
    ("data", "prepared_dir", "prepared"),
    ("validation", "report_dir", "validation"),
    ("pretrain", "output_dir", "pretrain"),
    ("train", "output_dir", "train"),
    ("evaluate", "output_dir", "eval"),
    ("crosssim", "output_dir", "adapt"),
)


class PipelineConfig(_Section):
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    crosssim: CrossSimConfig = Field(default_factory=CrossSimConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    runs: RunsConfig = Field(default_factory=RunsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    def served_sites(self) -> tuple[str, ...]:
        """The sites a served request (and its outcome) may name: ``serve.sites``, else the training sites."""
        return tuple(self.serve.sites or [self.data.source, *self.data.external])

    def in_run_folder(self, run_dir: Path) -> PipelineConfig:
        """A copy whose per-run outputs (validation reports, prepared images, checkpoints, evaluation,
        adaptation) live under ``run_dir``. Shared state stays shared: the prepared-image cache is
        content-addressed and the tracking store is transactional."""
        raw = self.model_dump()
        for section, key, folder in RUN_FOLDER_LAYOUT:
            raw[section][key] = Path(run_dir) / folder
        return PipelineConfig.model_validate(raw)

    def anchored(self, base: Path) -> PipelineConfig:
        """A copy whose relative paths (outputs, caches, data root) are made absolute under ``base``."""
        raw = self.model_dump()
        raw["data"]["root"] = self.data.resolved_root()
        for section, key in _PATH_FIELDS:
            value = raw[section][key]
            if value is not None and value != PRETRAIN_WEIGHTS and not Path(value).is_absolute():
                raw[section][key] = (base / value).resolve()
        return PipelineConfig.model_validate(raw)

    @field_validator("data")
    @classmethod
    def _external_differs_from_source(cls, data: DataConfig) -> DataConfig:
        if data.source in data.external:
            raise ValueError(f"data.external must not repeat data.source ({data.source!r})")
        return data

    @model_validator(mode="after")
    def _target_is_an_external_site(self) -> PipelineConfig:
        if self.crosssim.enabled and self.crosssim.target not in self.data.external:
            raise ValueError(
                f"crosssim.target {self.crosssim.target!r} must be one of data.external {self.data.external} "
                "(it is validated and prepared like every external site)"
            )
        return self


_PATH_FIELDS = (
    ("data", "root"),
    ("data", "cache_dir"),
    ("data", "prepared_dir"),
    ("validation", "report_dir"),
    ("pretrain", "cache_dir"),
    ("pretrain", "output_dir"),
    ("train", "output_dir"),
    ("train", "pretrained_weights"),
    ("evaluate", "output_dir"),
    ("crosssim", "test_set"),
    ("crosssim", "output_dir"),
    ("tracking", "local_dir"),
    ("ingest", "data_dir"),
    ("ingest", "dvc_target"),
    ("ingest", "quarantine_dir"),
    ("ingest", "report_dir"),
    ("ingest", "log_path"),
    ("runs", "dir"),
    ("serve", "ledger_path"),
    ("serve", "image_store"),
    ("loop", "exports_dir"),
)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
    key, raw = item.split("=", 1)
    # YAML parsing gives ints, floats, bools, null and [lists] the same meaning as in params.yaml.
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs in a raw config mapping (values parsed as YAML)."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read ``params.yaml`` (or defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    base = path.resolve().parent if path is not None else Path.cwd()
    try:
        return PipelineConfig.model_validate(raw).anchored(base)
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from exc


def _problem(error: Any) -> str:
    message = error["msg"].removeprefix("Value error, ")
    location = ".".join(map(str, error["loc"]))
    return f"{location}: {message}" if location else message
