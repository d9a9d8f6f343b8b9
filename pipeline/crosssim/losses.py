"""CrossSim's losses for adapting the source (pediatric) model to a target (adult) hospital.

One ``nn.Module`` per loss, in the style of TLlib's ``tllib/alignment/dann.py``. Discriminator
outputs are logits (see :class:`~pipeline.crosssim.modules.DomainDiscriminator`) and every loss
returns the batch mean as a scalar tensor. :func:`proxy_a_distance` measures the domain gap.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from pipeline.crosssim.modules import WarmStartGradientReverseLayer


def _logits(name: str, logits: torch.Tensor) -> torch.Tensor:
    """Discriminator logits as ``(N,)``; ``(N, 1)`` is what DomainDiscriminator returns."""
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits.squeeze(1)
    if logits.ndim != 1:
        raise ValueError(f"{name}: expected discriminator logits of shape (N,) or (N, 1), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{name}: empty batch")
    return logits


def _features(name: str, features: torch.Tensor) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, F), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")


def _logit_pair(first_name: str, first: torch.Tensor, second_name: str, second: torch.Tensor) -> None:
    """Two classifiers' logits for the same images: both (N, C), N > 0."""
    if first.ndim != 2 or first.shape != second.shape:
        raise ValueError(
            f"{first_name} and {second_name} must both be (N, C): got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    if first.shape[0] == 0:
        raise ValueError(f"{first_name}: empty batch")


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Mean of -log D (label 1) or -log(1 - D) (label 0), with D = sigmoid(logits)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


class DiscriminatorLoss(nn.Module):
    r"""Loss of the domain discriminator :math:`D`, source labelled 1 and target 0.

    .. math::
        L_D = -\mathbb{E}_{x_s}[\log D(f_s)] - \mathbb{E}_{x_t}[\log(1 - D(f_t))]

    Inputs are :math:`D`'s logits on source and target features (batch sizes may differ). The
    caller must compute them from *detached* features (``D(f.detach())``): this step trains
    :math:`D` only, and gradients reaching the feature extractor here would help it *separate*
    the domains. :class:`AdversarialAlignmentLoss` is the feature extractor's side.
    """

    def forward(self, source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        return _bce(_logits("source_logits", source_logits), 1.0) + _bce(_logits("target_logits", target_logits), 0.0)


class AdversarialAlignmentLoss(nn.Module):
    r"""Non-saturating generator loss for the *target* feature extractor: look like the source.

    .. math::
        L_{adv} = -\mathbb{E}_{x_t}[\log D(f_t)]

    Input: :math:`D`'s logits on target features (not detached; :math:`D`'s own parameters are
    left out of this step's optimiser). Minimising :math:`-\log D` rather than
    :math:`\log(1 - D)` keeps gradients large while :math:`D` still easily spots the target.
    """

    def forward(self, target_logits: torch.Tensor) -> torch.Tensor:
        return _bce(_logits("target_logits", target_logits), 1.0)


class FeatureConsistencyLoss(nn.Module):
    r"""Keeps the adapted target features near the frozen source model's, on target images.

    .. math::
        L_{fc} = \lambda\, \mathbb{E}_{x_t} \lVert F_{src}(x_t) - F_{tgt}(x_t) \rVert_2

    (mean over the batch of the per-sample L2 norm). The adversarial loss alone can align the
    domains by moving target features anywhere the discriminator is fooled, including places the
    source-trained head cannot classify; this anchor keeps them where that head still works.
    :math:`F_{src}` is frozen: the caller passes its features under ``torch.no_grad()``, and they
    are detached here as well so no gradient can reach the source model.
    """

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam

    def forward(self, source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        _features("source_features", source_features)
        _features("target_features", target_features)
        if source_features.shape != target_features.shape:
            raise ValueError(
                "source_features and target_features must be the same images through both models: "
                f"shapes {tuple(source_features.shape)} and {tuple(target_features.shape)} differ"
            )
        distance = torch.linalg.vector_norm(source_features.detach() - target_features, dim=1)
        return self.lam * distance.mean()


class DomainAdversarialLoss(nn.Module):
    r"""DANN (Ganin et al., ICML 2015): discriminator behind a gradient reversal layer :math:`R`.

    .. math::
        L_{dann} = -\tfrac12 \left( \mathbb{E}_{x_s}[\log D(R(f_s))]
                   + \mathbb{E}_{x_t}[\log(1 - D(R(f_t)))] \right)

    One backward pass trains :math:`D` to minimise it while :math:`R` hands the features the
    negated (``coeff``-scaled) gradient, so the feature extractor maximises it: a single optimiser
    step replaces the alternating :class:`DiscriminatorLoss` / :class:`AdversarialAlignmentLoss`.
    :math:`f_s, f_t` are concatenated into one batch so the discriminator's BatchNorm sees both
    domains with shared statistics. ``grl`` defaults to
    ``WarmStartGradientReverseLayer(auto_step=True)``. After each call ``domain_accuracy`` holds
    :math:`D`'s accuracy averaged over the two domains (0.5 means the domains are aligned).
    """

    def __init__(self, discriminator: nn.Module, grl: nn.Module | None = None) -> None:
        super().__init__()
        self.discriminator = discriminator
        # built here, not as a default argument: a default module would be shared by every instance
        self.grl = grl if grl is not None else WarmStartGradientReverseLayer(auto_step=True)
        self.domain_accuracy: float | None = None

    def forward(self, source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        _features("source_features", source_features)
        _features("target_features", target_features)
        if source_features.shape[1] != target_features.shape[1]:
            raise ValueError(
                f"feature widths differ: source {source_features.shape[1]}, target {target_features.shape[1]}"
            )
        logits = self.discriminator(self.grl(torch.cat((source_features, target_features))))
        source_logits, target_logits = _logits("discriminator output", logits).split(
            [source_features.shape[0], target_features.shape[0]]
        )
        with torch.no_grad():
            source_hits = (source_logits >= 0).float().mean()
            target_hits = (target_logits < 0).float().mean()
            self.domain_accuracy = 0.5 * (source_hits + target_hits).item()
        return 0.5 * (_bce(source_logits, 1.0) + _bce(target_logits, 0.0))


class DistillationLoss(nn.Module):
    r"""Distils the frozen source model (teacher :math:`t`) into the adapted model (student :math:`s`).

    .. math::
        L = \alpha\, \mathrm{CE}(y, s) + (1 - \alpha)\, T^2\,
            \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\Vert\, \mathrm{softmax}(s / T)\big)

    (Hinton et al., 2015; :math:`T^2` keeps the soft term's gradients on the scale of the hard
    one as :math:`T` changes). Both are batch means. With ``labels=None`` (unlabelled target
    images) the loss is :math:`T^2 \mathrm{KL}` alone. If ``pseudo_label_threshold`` is set and
    ``labels`` is None, rows where the teacher's probability (at :math:`T = 1`) of its top class is
    at least the threshold take that class as a hard label, and the CE term is the mean over those
    rows only; a batch with no such row falls back to :math:`T^2 \mathrm{KL}`. The teacher's logits
    are detached. With :math:`\alpha = 1` and labels, :math:`L` equals ``F.cross_entropy``.
    """

    def __init__(
        self, alpha: float = 0.7, temperature: float = 2.0, pseudo_label_threshold: float | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if pseudo_label_threshold is not None and not 0.0 < pseudo_label_threshold <= 1.0:
            raise ValueError(f"pseudo_label_threshold must be in (0, 1], got {pseudo_label_threshold}")
        self.alpha = alpha
        self.temperature = temperature
        self.pseudo_label_threshold = pseudo_label_threshold

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        _logit_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
        if labels is not None and labels.shape != student_logits.shape[:1]:
            raise ValueError(f"labels: expected shape ({student_logits.shape[0]},), got {tuple(labels.shape)}")
        teacher_logits = teacher_logits.detach()
        t = self.temperature
        soft = (t * t) * F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        if labels is not None:
            hard = F.cross_entropy(student_logits, labels)
        elif self.pseudo_label_threshold is None:
            return soft
        else:
            confidence, pseudo_labels = F.softmax(teacher_logits, dim=1).max(dim=1)
            confident = confidence >= self.pseudo_label_threshold
            if not confident.any():
                return soft
            hard = F.cross_entropy(student_logits[confident], pseudo_labels[confident])
        return self.alpha * hard + (1.0 - self.alpha) * soft


class AugmentationConsistencyLoss(nn.Module):
    r"""Prediction consistency between two views of the same unlabelled images (UDA, Xie et al. 2020).

    .. math::
        L_{cons} = \frac{1}{B} \sum_i \mathrm{KL}\big(p(y \mid \mathrm{weak}(x_i)) \,\|\, p(y \mid \mathrm{strong}(x_i))\big)

    The weak view's prediction is the target and gets no gradient (it is detached here), so
    only the strongly augmented view is pulled towards it: the model learns to give the same
    answer for an image however it was shifted, zoomed, blurred or partly covered, which is
    what a few labelled images alone cannot teach it on the target hospital's images.

    Inputs: logits of the weak and strong views, both ``(N, C)`` in the same image order.
    """

    def forward(self, weak_logits: torch.Tensor, strong_logits: torch.Tensor) -> torch.Tensor:
        _logit_pair("weak_logits", weak_logits, "strong_logits", strong_logits)
        return F.kl_div(
            F.log_softmax(strong_logits, dim=1),
            F.log_softmax(weak_logits.detach(), dim=1),
            reduction="batchmean",
            log_target=True,
        )


class DistributionAlignedPseudoLabelLoss(nn.Module):
    r"""AdaMatch's unlabelled loss (Berthelot et al., ICLR 2022): hard pseudo-labels from the weak view, their class
    distribution aligned to the labelled images', kept only when confident relative to the labelled images.

    With :math:`p_u = \mathrm{softmax}(\mathrm{weak}(x^u))` on the unlabelled batch and
    :math:`p_l = \mathrm{softmax}(\mathrm{weak}(x^l))` on the labelled one (both without gradient):

    .. math::
        \tilde p_u = \mathrm{normalise}\Big(p_u \odot \frac{\mathbb{E}[p_l]}{\mathbb{E}[p_u]}\Big), \qquad
        \tau = \tau_{rel} \cdot \mathbb{E}\big[\max_c p_l\big]

    .. math::
        L = \frac{1}{B_u} \sum_i \mathbb{1}\big[\max_c \tilde p_{u,i} \ge \tau\big]\,
            \mathrm{CE}\big(\mathrm{strong}(x^u_i), \arg\max_c \tilde p_{u,i}\big)

    The alignment is what matters under label shift: a model carried over from a hospital with another class mix
    (Kermany is ~74% pneumonia) labels the new hospital's images with that mix; rescaling by the ratio of the
    labelled images' mean prediction to the unlabelled ones' gives pseudo-labels with the labelled mix instead.
    The threshold is relative, so it follows the model's own confidence rather than a fixed 0.95 a fresh model
    never reaches. Returns the loss and the share of pseudo-labels kept.

    Inputs: logits ``(N_u, C)`` of the weak and strong views of the unlabelled images (same order), and ``(N_l, C)``
    of the weak view of the labelled images.
    """

    def __init__(self, relative_confidence: float) -> None:
        super().__init__()
        if not 0 < relative_confidence <= 1:
            raise ValueError(f"relative_confidence must be in (0, 1], got {relative_confidence}")
        self.relative_confidence = relative_confidence

    def forward(
        self, weak_logits: torch.Tensor, strong_logits: torch.Tensor, labelled_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _logit_pair("weak_logits", weak_logits, "strong_logits", strong_logits)
        with torch.no_grad():
            unlabelled = F.softmax(weak_logits.detach().float(), dim=1)
            labelled = F.softmax(labelled_logits.detach().float(), dim=1)
            aligned = unlabelled * (labelled.mean(0) / unlabelled.mean(0).clamp_min(1e-6))
            aligned = aligned / aligned.sum(dim=1, keepdim=True)
            confidence, pseudo = aligned.max(dim=1)
            kept = (confidence >= self.relative_confidence * labelled.max(dim=1).values.mean()).float()
        loss = (F.cross_entropy(strong_logits, pseudo, reduction="none") * kept).mean()
        return loss, kept.mean()


def binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    r"""Per-sample entropy of a Bernoulli prediction, in bits: :math:`H(p) = -p\log_2 p - (1-p)\log_2(1-p)`.

    0 for a certain prediction, 1 for p = 0.5; used to judge how sure a model is on target images.
    """
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    return -(p * p.log2() + (1 - p) * (1 - p).log2())


def proxy_a_distance(
    source_features: np.ndarray | torch.Tensor, target_features: np.ndarray | torch.Tensor, seed: int
) -> float:
    r"""Proxy A-distance (Ben-David et al., 2007) between two feature sets, in [0, 2].

    .. math::
        \mathrm{PAD} = 2 (1 - 2 \epsilon)

    where :math:`\epsilon` is the test error of a linear classifier (standardised features,
    logistic regression) trained to tell source from target on a stratified 50/50 split drawn with
    ``seed``. 0: the domains are indistinguishable; 2: linearly separable. Clipped to [0, 2]
    because a worse-than-chance classifier means no detectable gap, not a negative one.
    """
    arrays = []
    for name, features in (("source_features", source_features), ("target_features", target_features)):
        array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if array.ndim != 2:
            raise ValueError(f"{name}: expected features of shape (N, F), got {array.shape}")
        if array.shape[0] < 2:  # a stratified split puts at least one row of each domain on each side
            raise ValueError(f"{name}: need at least 2 samples, got {array.shape[0]}")
        arrays.append(array.astype(np.float64))
    source, target = arrays
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"feature widths differ: source {source.shape[1]}, target {target.shape[1]}")
    x = np.concatenate([source, target])
    y = np.concatenate([np.ones(len(source)), np.zeros(len(target))])
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    error = 1.0 - classifier.fit(x_train, y_train).score(x_test, y_test)
    return float(np.clip(2.0 * (1.0 - 2.0 * error), 0.0, 2.0))
