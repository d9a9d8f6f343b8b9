"""CrossSim: adapt the source (pediatric) classifier to a target (adult) hospital without its labels.

This package holds the alignment building blocks and losses; see ``losses`` for the maths.
"""

from pipeline.crosssim.diagnostics import DomainGap, domain_gap
from pipeline.crosssim.losses import (
    AdversarialAlignmentLoss,
    AugmentationConsistencyLoss,
    DiscriminatorLoss,
    DistillationLoss,
    DistributionAlignedPseudoLabelLoss,
    DomainAdversarialLoss,
    FeatureConsistencyLoss,
    proxy_a_distance,
)
from pipeline.crosssim.modules import (
    DomainDiscriminator,
    GradientReverseFunction,
    GradientReverseLayer,
    MappingHead,
    WarmStartGradientReverseLayer,
)
from pipeline.crosssim.target import TargetSplit, split_target

__all__ = [
    "AdversarialAlignmentLoss",
    "AugmentationConsistencyLoss",
    "DiscriminatorLoss",
    "DistillationLoss",
    "DistributionAlignedPseudoLabelLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "DomainGap",
    "FeatureConsistencyLoss",
    "GradientReverseFunction",
    "GradientReverseLayer",
    "MappingHead",
    "TargetSplit",
    "WarmStartGradientReverseLayer",
    "domain_gap",
    "proxy_a_distance",
    "split_target",
]
