"""What ``crosssim serve``'s app serves with (``pipeline/serving/service.py`` assembles it), shared by its routes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.config import IngestConfig, LoopConfig
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger
from pipeline.serving.model_source import LiveModel


@dataclass(frozen=True)
class ServeDependencies:
    """What the app serves with. The app closes ``ledger`` at shutdown."""

    live: LiveModel
    ledger: PredictionLedger
    images: ImageStore
    sites: tuple[str, ...]  # what a request's ``site`` may be
    ingest: IngestConfig  # names the environment variables holding each site's secret salt
    environ: Mapping[str, str]  # where those salts are read
    api_key: str | None  # None: the admin routes are not mounted
    outcome_sources: tuple[str, ...] = ()  # who may report labels (rollout.outcome_sources), precedence first
    loop: LoopConfig = field(default_factory=LoopConfig)  # how the read worklist ranks cases
