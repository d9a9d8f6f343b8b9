"""CrossSim losses against values worked out by hand; PAD on real pediatric vs adult X-rays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.crosssim import (
    AdversarialAlignmentLoss,
    AugmentationConsistencyLoss,
    DiscriminatorLoss,
    DistillationLoss,
    DistributionAlignedPseudoLabelLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    FeatureConsistencyLoss,
    GradientReverseLayer,
    MappingHead,
    WarmStartGradientReverseLayer,
    proxy_a_distance,
)


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x): the BCE of a logit whose label is the other class."""
    return math.log(1.0 + math.exp(x))


def identity_discriminator() -> nn.Linear:
    """D(f) = f for 1-d features, so the logits are the numbers written in each test."""
    linear = nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.zero_()
    return linear


def test_discriminator_loss_by_hand():
    source, target = torch.tensor([0.0, 2.0]), torch.tensor([[-1.0], [1.0]])  # (N,) and (N, 1) both accepted
    # -log sigmoid(z) = log(1 + e^-z) for source (label 1); -log(1 - sigmoid(z)) = log(1 + e^z) for target
    expected = (softplus(-0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(1.0)) / 2
    assert DiscriminatorLoss()(source, target).item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_alignment_loss_wants_target_called_source():
    target = torch.tensor([0.0, 2.0], requires_grad=True)
    loss = AdversarialAlignmentLoss()(target)
    assert loss.item() == pytest.approx((math.log(2.0) + softplus(-2.0)) / 2, rel=1e-6)
    loss.backward()
    assert (target.grad < 0).all()  # descending raises D(f_t): target features move towards "source"


def test_feature_consistency_by_hand_and_source_stays_frozen():
    source = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    loss = FeatureConsistencyLoss(lam=0.5)(source, target)
    assert loss.item() == pytest.approx(0.5 * (5.0 + 0.0) / 2)  # norms 5 (3-4-5) and 0
    loss.backward()
    assert source.grad is None
    # at a zero difference (the adapted model starts as a copy of the source) the gradient is 0, not NaN
    assert torch.equal(target.grad[1], torch.zeros(2))


def test_gradient_reverse_layer_flips_and_scales_gradients():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([0.5, 1.0, -4.0])
    y = GradientReverseLayer(coeff=0.3)(x)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    assert torch.allclose(x.grad, -0.3 * upstream)


def test_warm_start_schedule_rises_from_lo_to_hi():
    grl = WarmStartGradientReverseLayer(alpha=10.0, lo=0.2, hi=1.0, max_iters=100)
    assert grl.coeff == pytest.approx(0.2)
    grl.iter_num = 10  # 2 * 0.8 / (1 + e^-1) - 0.8 + 0.2
    assert grl.coeff == pytest.approx(1.6 / (1.0 + math.exp(-1.0)) - 0.6)
    grl.iter_num = 1000
    assert grl.coeff == pytest.approx(1.0, abs=1e-6)

    auto = WarmStartGradientReverseLayer(max_iters=10, auto_step=True)
    x = torch.ones(3, requires_grad=True)
    auto(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros(3))  # coeff was lo = 0 on the first call
    auto(torch.ones(3))
    assert auto.iter_num == 2

    resumed = WarmStartGradientReverseLayer(max_iters=10)
    resumed.load_state_dict(auto.state_dict())
    assert resumed.iter_num == 2  # a resumed run continues the schedule


def test_domain_adversarial_loss_by_hand():
    dann = DomainAdversarialLoss(identity_discriminator(), grl=GradientReverseLayer(1.0))
    source = torch.tensor([[0.0], [2.0]], requires_grad=True)
    target = torch.tensor([[-1.0], [1.0], [3.0]], requires_grad=True)  # batch sizes may differ
    loss = dann(source, target)
    expected = 0.5 * ((softplus(-0.0) + softplus(-2.0)) / 2 + (softplus(-1.0) + softplus(1.0) + softplus(3.0)) / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert dann.domain_accuracy == pytest.approx(0.5 * (2 / 2 + 1 / 3))  # target 1.0 and 3.0 look like source

    loss.backward()
    plain_source, plain_target = source.detach().requires_grad_(), target.detach().requires_grad_()
    plain = DomainAdversarialLoss(identity_discriminator(), grl=nn.Identity())(plain_source, plain_target)
    plain.backward()
    assert torch.allclose(source.grad, -plain_source.grad) and torch.allclose(target.grad, -plain_target.grad)


def test_domain_adversarial_loss_defaults_to_its_own_warm_start_grl():
    first, second = DomainAdversarialLoss(DomainDiscriminator(4, hidden=8)), DomainAdversarialLoss(nn.Linear(4, 1))
    assert isinstance(first.grl, WarmStartGradientReverseLayer) and first.grl is not second.grl
    first(torch.randn(5, 4), torch.randn(3, 4))
    assert first.grl.iter_num == 1 and second.grl.iter_num == 0
    assert first.domain_accuracy is not None and 0.0 <= first.domain_accuracy <= 1.0


def test_mapping_head_and_discriminator_shapes():
    features = MappingHead(32)(torch.randn(6, 32))
    assert features.shape == (6, 256) and (features >= 0).all()
    assert DomainDiscriminator(256, hidden=16)(features).shape == (6, 1)


def test_distillation_with_alpha_one_is_cross_entropy():
    student, teacher = torch.randn(8, 2), torch.randn(8, 2)
    labels = torch.randint(0, 2, (8,))
    loss = DistillationLoss(alpha=1.0, temperature=3.0)(student, teacher, labels)
    assert torch.equal(loss, F.cross_entropy(student, labels))


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_distillation_without_labels_is_scaled_kl_by_hand():
    log3 = math.log(3.0)
    student = torch.tensor([[0.0, 0.0], [2 * log3, 0.0]])
    teacher = torch.tensor([[log3, 0.0], [0.0, 0.0]])
    # T = 2: softmax([ln3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1); softmax([ln3, 0]) = [3/4, 1/4]
    root3 = math.sqrt(3.0)
    kl_rows = [kl([root3 / (root3 + 1), 1 / (root3 + 1)], [0.5, 0.5]), kl([0.5, 0.5], [0.75, 0.25])]
    soft = 2.0**2 * sum(kl_rows) / 2
    distill = DistillationLoss(alpha=0.7, temperature=2.0)
    assert distill(student, teacher).item() == pytest.approx(soft, rel=1e-5)

    labels = torch.tensor([0, 1])  # CE: -log 0.5 and -log(1/10), softmax([2 ln3, 0]) = [9/10, 1/10]
    hard = (math.log(2.0) + math.log(10.0)) / 2
    assert distill(student, teacher, labels).item() == pytest.approx(0.7 * hard + 0.3 * soft, rel=1e-5)


def test_pseudo_labels_only_for_confident_teacher_rows():
    student = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax [1/4, 3/4] and [1/2, 1/2]
    teacher = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0]])  # softmax [9/10, 1/10] and [1/2, 1/2]
    soft = (kl([0.9, 0.1], [0.25, 0.75]) + 0.0) / 2  # T = 1
    # only row 0 is confident (0.9 >= 0.85); its pseudo-label is class 0: CE = -log(1/4)
    distill = DistillationLoss(alpha=0.5, temperature=1.0, pseudo_label_threshold=0.85)
    assert distill(student, teacher).item() == pytest.approx(0.5 * math.log(4.0) + 0.5 * soft, rel=1e-5)
    strict = DistillationLoss(alpha=0.5, temperature=1.0, pseudo_label_threshold=0.95)
    assert strict(student, teacher).item() == pytest.approx(soft, rel=1e-5)  # no confident row: KL only


def test_augmentation_consistency_by_hand_and_only_the_strong_view_learns():
    weak = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)  # softmax [1/2, 1/2], [3/4, 1/4]
    strong = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    loss = AugmentationConsistencyLoss()(weak, strong)
    # KL(weak ‖ strong) per row, batch mean: row 1's views agree
    assert loss.item() == pytest.approx((kl([0.5, 0.5], [0.75, 0.25]) + 0.0) / 2, rel=1e-5)
    loss.backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0  # the weak view is the fixed target
    # ∂L/∂strong = (softmax(strong) − softmax(weak)) / N: row 0 pulled towards [1/2, 1/2], row 1 left alone
    torch.testing.assert_close(strong.grad, torch.tensor([[0.125, -0.125], [0.0, 0.0]]))


def test_distribution_alignment_turns_pseudo_labels_to_the_labelled_class_mix():
    # the unlabelled weak view says "pneumonia" (class 1) at 0.6 for every image, the labelled images average 50/50:
    # aligned, p ∝ [0.4·0.5/0.4, 0.6·0.5/0.6] = [1/2, 1/2] → ties go to class 0 (argmax), confidence 0.5
    weak = torch.log(torch.tensor([[0.4, 0.6]] * 4))
    labelled = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))  # mean [1/2, 1/2], mean confidence 0.9
    strong = torch.zeros(4, 2, requires_grad=True)
    loss, kept = DistributionAlignedPseudoLabelLoss(relative_confidence=0.5)(weak, strong, labelled)
    assert kept.item() == 1.0  # 0.5 ≥ 0.5 · 0.9
    assert loss.item() == pytest.approx(math.log(2.0))  # CE of uniform strong logits against any class
    loss.backward()
    torch.testing.assert_close(strong.grad, torch.tensor([[-0.125, 0.125]] * 4))  # (softmax − onehot(0)) / 4
    # unaligned, these images would all have been pseudo-labelled pneumonia; a high bar keeps none of them
    loss, kept = DistributionAlignedPseudoLabelLoss(relative_confidence=0.9)(weak, strong, labelled)
    assert kept.item() == 0.0 and loss.item() == 0.0
    # confident, unbiased predictions keep their own labels
    mixed = torch.log(torch.tensor([[0.95, 0.05], [0.05, 0.95]]))
    loss, kept = DistributionAlignedPseudoLabelLoss(0.9)(mixed, mixed.clone().requires_grad_(), labelled)
    assert kept.item() == 1.0 and loss.item() == pytest.approx(-math.log(0.95), rel=1e-5)
    with pytest.raises(ValueError, match="relative_confidence"):
        DistributionAlignedPseudoLabelLoss(0.0)


def test_proxy_a_distance_on_synthetic_features():
    rng = np.random.default_rng(0)
    same_a, same_b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert proxy_a_distance(same_a, same_b, seed=0) < 0.3
    far = torch.from_numpy(rng.normal(loc=5.0, size=(400, 8)))  # tensors are accepted too
    assert proxy_a_distance(torch.from_numpy(same_a), far, seed=0) == pytest.approx(2.0)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="empty batch"):
        DiscriminatorLoss()(torch.tensor([]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        AdversarialAlignmentLoss()(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="differ"):
        FeatureConsistencyLoss()(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty batch"):
        FeatureConsistencyLoss()(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="feature widths differ"):
        DomainAdversarialLoss(nn.Linear(4, 1))(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        DistillationLoss()(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss()(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="weak_logits and strong_logits"):
        AugmentationConsistencyLoss()(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty batch"):
        AugmentationConsistencyLoss()(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="pseudo_label_threshold"):
        DistillationLoss(pseudo_label_threshold=1.5)
    with pytest.raises(ValueError, match="feature widths differ"):
        proxy_a_distance(np.zeros((4, 3)), np.zeros((4, 2)), seed=0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        proxy_a_distance(np.zeros((1, 3)), np.zeros((4, 3)), seed=0)


def test_proxy_a_distance_separates_real_pediatric_and_adult_xrays(data_dir: Path):
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist.npz") as data:
        pediatric = data["train_images"][:32].reshape(32, -1) / 255.0
    # NIH PNGs to PneumoniaMNIST's format: 28x28 grayscale
    files = sorted((data_dir / "nih-cxr8" / "images").glob("*.png"))[:32]
    adult = np.stack([np.asarray(Image.open(f).convert("L").resize((28, 28), Image.BILINEAR)) for f in files])
    adult = adult.reshape(32, -1) / 255.0

    across = proxy_a_distance(pediatric, adult, seed=0)
    within = max(
        proxy_a_distance(pediatric[:16], pediatric[16:], seed=0), proxy_a_distance(adult[:16], adult[16:], seed=0)
    )
    assert across > 1.0 and across - within > 0.75, (across, within)
