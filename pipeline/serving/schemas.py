"""The JSON bodies of ``crosssim serve`` (FastAPI response models: they make the OpenAPI document)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.serving.model_source import ServedModel


class ModelIdentity(BaseModel):
    """Which registered version answered, and which of its artifacts."""

    name: str
    version: str
    alias: str | None = Field(description="The alias followed; null when the version is pinned.")
    precision: Literal["fp32", "int8"]
    artifact_sha256: str = Field(description="SHA-256 of the ONNX file that computed the answer.")

    @classmethod
    def of(cls, model: ServedModel) -> ModelIdentity:
        return cls(
            name=model.name,
            version=model.version,
            alias=model.alias,
            precision=model.precision,
            artifact_sha256=model.artifact_sha256,
        )


class Prediction(BaseModel):
    inference_id: str = Field(description="The ledger row's key (and the stored image's name).")
    probability: float = Field(ge=0, le=1, description="P(pneumonia).")
    decision: Literal["pneumonia", "normal"] = Field(description="pneumonia when probability >= threshold.")
    threshold: float = Field(
        description="The operating point decided at: the site's own, chosen on its matured reads (registry site-threshold), "
        "else the version's, chosen on its source validation split."
    )
    model: ModelIdentity
    latency_ms: float = Field(
        description="Server time from the received upload to the answer (decode, batch, inference)."
    )
    converted_from: str | None = Field(
        description="The stored format when it was converted to 8-bit grayscale as training images were "
        "(RGB, RGBA, I;16, P, DICOM, ...); null for 8-bit grayscale."
    )
    site: str
    arm: Literal["champion", "challenger"] | None = Field(
        default=None, description="During a rollout: the arm that answered (shadow mode: always the champion)."
    )


class Explanation(BaseModel):
    model: ModelIdentity = Field(description="The served version; the map comes from its FP32 PyTorch twin.")
    explained_artifact: str = Field(description="The PyTorch model the map was computed on (models:/<name>/<version>).")
    method: Literal["grad-cam"] = "grad-cam"
    layer: str = Field(description="Module the map was taken at (the backbone's last convolutional block).")
    probability: float = Field(description="The twin's P(pneumonia) (the served ONNX artifact's may differ slightly).")
    map_size: list[int] = Field(description="[height, width] of `map`: the model's input size.")
    map: list[list[float]] = Field(description="Grad-CAM (ReLU'd, not normalised) at the model's input size.")
    overlay_png: str = Field(description="Base64 PNG: the map (jet, normalised) over the grayscale upload.")
    converted_from: str | None


class ServedModelInfo(BaseModel):
    model: ModelIdentity
    backbone: str
    image_size: int
    harmonisation: str = Field(description="Intensity harmonisation applied after the resize (none, histeq, clahe).")
    threshold: float = Field(description="The bundle's: what a site without its own threshold is answered at.")
    threshold_chosen_on: str
    site_thresholds: dict[str, float] = Field(
        description="Sites answered at their own operating point, chosen on their matured reads (version tag site_thresholds)."
    )
    precisions: list[str] = Field(description="Artifacts the version carries (fp32, int8).")
    notes: list[str] = Field(description="Why an artifact is missing, if one is.")
    follows_alias: bool = Field(description="True: an alias move (or a site's new threshold) is picked up without a restart.")
    poll_seconds: float

    @classmethod
    def of(cls, model: ServedModel, follows_alias: bool, poll_seconds: float) -> ServedModelInfo:
        bundle = model.bundle
        return cls(
            model=ModelIdentity.of(model),
            backbone=bundle.backbone,
            image_size=bundle.image_size,
            harmonisation=bundle.harmonisation,
            threshold=model.threshold,
            threshold_chosen_on=bundle.threshold_chosen_on,
            site_thresholds=model.site_thresholds,
            precisions=sorted(bundle.artifacts),
            notes=bundle.notes,
            follows_alias=follows_alias,
            poll_seconds=poll_seconds,
        )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model: str | None
    ledger: Literal["ok", "unavailable"]


class Reload(BaseModel):
    previous: str
    current: str
    changed: bool


class ErrorBody(BaseModel):
    error: str = Field(description="The rule the request broke, e.g. image_too_small, unknown_site, body_too_large.")
    detail: str


class OutcomeIn(BaseModel):
    """A label for an answered prediction, named by its ``inference_id`` or by the study (``site`` + ``study_id``)."""

    inference_id: str | None = Field(default=None, description="As returned by /v1/predict.")
    study_id: str | None = Field(default=None, description="The study id sent to /v1/predict (matched by pseudonym).")
    site: str | None = Field(default=None, description="The site that sent the study (its salt makes the pseudonym).")
    label: str = Field(description="normal | pneumonia")
    source: str = Field(description="Who established it: one of rollout.outcome_sources (e.g. radiologist_read).")
    observed_at: datetime | None = Field(default=None, description="When it was established (ISO 8601 with zone).")


class OutcomeRecorded(BaseModel):
    status: Literal["recorded", "duplicate", "conflict"] = Field(
        description="duplicate: already known, nothing stored; conflict: stored, but another label disagrees."
    )
    inference_ids: list[str]
    requested: bool = Field(description="A read worklist asked for this case; false: an unrequested report (kept too).")


class WorklistEntry(BaseModel):
    rank: int = Field(description="1: read first.")
    inference_id: str = Field(description="As /v1/predict returned it; report the read with it to /v1/feedback.")
    site: str
    study_pseudonym: str | None = Field(
        description="The study's keyed pseudonym (the study id itself is never stored)."
    )
    served_at: datetime
    probability: float = Field(description="P(pneumonia) as served.")
    threshold: float = Field(description="The operating point it was served at.")
    score: float = Field(description="The strategy's priority: higher is asked first.")


class WorklistSite(BaseModel):
    site: str
    candidates: int = Field(description="Served, unlabelled, not yet asked for, image kept, inside the window.")
    labelled: int
    pending: int = Field(description="Asked for earlier, no read yet (never asked again).")
    without_image: int = Field(description="Unlabelled, but the image is no longer kept: a read could not train.")
    asked: int = Field(description="Of this worklist.")


class WorklistOut(BaseModel):
    worklist_id: str
    strategy: str
    budget: int
    requested_at: datetime
    recorded: bool = Field(description="false: a preview (or nothing to ask), nothing recorded as asked for.")
    items: list[WorklistEntry]
    sites: list[WorklistSite]

    @classmethod
    def of(cls, worklist: Any) -> WorklistOut:
        """From ``pipeline.loop.worklist.Worklist`` (its dataclasses, field for field)."""
        return cls.model_validate(asdict(worklist))
