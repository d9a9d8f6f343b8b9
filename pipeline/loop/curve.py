"""A site's learning curve as the registry knows it: each loop version of the site, the reads it learnt from, and
its AUC on the frozen evaluation sets its registration scored (version tag ``loop.held_out_auc``). The rollout
report draws it, so a reviewer deciding on a challenger sees where the site's models have been going."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.registry.store import ModelRegistry

LOOP_SITE_TAG = "loop.site"
LOOP_READS_TAG = "loop.reads"
HELD_OUT_AUC_TAG = "loop.held_out_auc"  # JSON: frozen set → AUC, as registration scored it


@dataclass(frozen=True)
class LearningPoint:
    version: str
    reads: int  # the site's labelled cases it learnt from
    auc: dict[str, float]  # frozen evaluation set → AUC


def site_learning_curve(registry: ModelRegistry, name: str, site: str) -> list[LearningPoint]:
    """The site's loop versions of ``name``, oldest first (versions registered before the tag existed are left out)."""
    return [
        LearningPoint(str(v.version), int(v.tags[LOOP_READS_TAG]), json.loads(v.tags[HELD_OUT_AUC_TAG]))
        for v in registry.versions(name)
        if v.tags.get(LOOP_SITE_TAG) == site and HELD_OUT_AUC_TAG in v.tags and LOOP_READS_TAG in v.tags
    ]
