import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bict_ray.core.losses import (BCTLoss, CompatibleTrainingLoss, ContrastiveLoss, L2Loss, RACTLoss, build_compat_loss,
                                  check_finite, masked_cross_entropy, synthesise_old_classifier, transform_loss)
from bict_ray.core.models import classifier_logits

E = math.e


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- classes a model does not train on are out of the softmax ------------------------------------------------

def test_masked_cross_entropy_by_hand_with_zero_gradient_on_the_masked_row():
    # 3 classes, class 1 masked out; linear classifier rows w0 = (1, 0), w1 = (0, 1), w2 = (-1, 0)
    weight = _t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).requires_grad_()
    features = _t([[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 2])
    mask = torch.tensor([True, False, True])
    value = masked_cross_entropy(classifier_logits("linear", weight, features, 1.0), labels, mask)
    # logits (1, 0, -1) and (0, 2, 0); over classes {0, 2} only: -log(e/(e + 1/e)) and -log(1/2)
    torch.testing.assert_close(value, torch.tensor((math.log(1 + E ** -2) + math.log(2)) / 2))
    value.backward()
    assert torch.equal(weight.grad[1], torch.zeros(2))  # exactly: the row is out of the softmax
    # dL/dlogits = (p - onehot) / N with p = (1 - q, 0, q), q = e^-2 / (1 + e^-2), for sample 0, (1/2, 0, 1/2) for 1
    q = E ** -2 / (1 + E ** -2)
    torch.testing.assert_close(weight.grad, _t([[-q / 2, 0.5], [0.0, 0.0], [q / 2, -0.5]]))


def test_masked_cross_entropy_refuses_bad_masks_and_labels_outside_them():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"class mask must be a \(C,\) bool tensor for logits \(N, C\)"):
        masked_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"class mask must be"):
        masked_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"model: labels \[1\] are classes outside the class mask \(allowed: \[0, 2\]"):
        masked_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([True, False, True]), "model")


def test_new_model_cross_entropy_leaves_unseen_classes_out():
    logits = _t([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]).requires_grad_()
    labels = torch.tensor([0, 2])
    loss = CompatibleTrainingLoss(0.0, None, class_mask=torch.tensor([True, False, True]))
    out = loss(logits, torch.randn(2, 4), labels)
    torch.testing.assert_close(out["ce"], torch.tensor((math.log(1 + E ** -2) + math.log(2)) / 2))
    out["total"].backward()
    assert torch.equal(logits.grad[:, 1], torch.zeros(2))
    # no mask: all rows, exactly the plain CE
    plain = CompatibleTrainingLoss(0.0, None)(logits, torch.randn(2, 4), labels)["ce"]
    assert torch.equal(plain, F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match=r"model cross-entropy: class mask must be a \(C,\) bool tensor"):
        CompatibleTrainingLoss(0.0, None, class_mask=torch.ones(4, dtype=torch.bool))(logits, torch.randn(2, 4), labels)
    with pytest.raises(ValueError, match="class_mask must be a"):
        CompatibleTrainingLoss(0.0, None, class_mask=torch.ones(3))


def test_transform_cross_entropy_runs_over_the_new_models_classes_only():
    # the new model trained on classes 0 and 1; row 2 is untrained and points where psi's output does
    weight, labels = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0])
    psi_out = _t([[1.0, 0.0]]).requires_grad_()
    out = transform_loss(psi_out, psi_out.detach(), labels, weight, "cosine", 2.0, alpha=1.0, beta=1.0,
                         class_mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(out["ce"], torch.tensor(math.log(1 + E ** -2)))
    unmasked = transform_loss(psi_out, psi_out.detach(), labels, weight, "cosine", 2.0, alpha=1.0, beta=1.0)
    torch.testing.assert_close(unmasked["ce"], torch.tensor(math.log(2 + E ** -2)))
    with pytest.raises(ValueError, match=r"transform: labels \[2\] are classes outside the class mask"):
        transform_loss(psi_out, psi_out.detach(), torch.tensor([2]), weight, "cosine", 2.0, 1.0, 1.0,
                       class_mask=torch.tensor([True, True, False]))


# --- synthesised old classifier -------------------------------------------------------------------------------

def test_synthesised_rows_are_normalised_class_means():
    old_weight = _t([[2.0, 0.0], [5.0, 5.0], [0.0, -3.0]])
    seen = torch.tensor([True, False, False])
    # class 1: directions (1, 0) and (0, 1) whatever the norms; class 0 has samples but was seen; class 2 none
    old_emb = _t([[1.0, 0.0], [0.0, 3.0], [0.0, 7.0]])
    labels = torch.tensor([1, 1, 0])
    weight, valid = synthesise_old_classifier(old_weight, seen, old_emb, labels)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(weight, _t([[2.0, 0.0], [s, s], [0.0, -3.0]]))
    assert valid.tolist() == [True, True, False]
    assert not weight.requires_grad


def test_synthesised_linear_rows_take_mean_seen_norm():
    old_weight = _t([[2.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    seen = torch.tensor([True, True, False])
    weight, valid = synthesise_old_classifier(old_weight, seen, _t([[0.0, -1.0]]), torch.tensor([2]),
                                              classifier="linear")
    torch.testing.assert_close(weight[2], _t([0.0, -3.0]))  # mean of norms 2 and 4
    assert valid.all()


def test_synthesis_refuses_bad_inputs():
    with pytest.raises(ValueError, match=r"old_embeddings must be \(N, 2\)"):
        synthesise_old_classifier(torch.ones(3, 2), torch.ones(3, dtype=torch.bool), torch.ones(4, 5),
                                  torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got range \[0, 7\]"):
        synthesise_old_classifier(torch.ones(3, 2), torch.ones(3, dtype=torch.bool), torch.ones(2, 2),
                                  torch.tensor([0, 7]))


# --- bct ------------------------------------------------------------------------------------------------------

def test_bct_by_hand():
    loss = BCTLoss(_t([[1.0, 0.0], [0.0, 1.0]]), classifier="cosine", scale=2.0)
    # sample 0 on class 0's row: logits (2, 0); sample 1 at 45 degrees: logits (sqrt2, sqrt2)
    value = loss(_t([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(value, torch.tensor((math.log(1 + E ** -2) + math.log(2)) / 2))


def test_bct_masks_classes_the_old_model_never_saw():
    # row 2 is untrained (invalid) and happens to point where sample 0 does: it must not be in the softmax
    loss = BCTLoss(_t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), scale=2.0, valid_mask=torch.tensor([True, True, False]))
    features = _t([[3.0, 0.0], [0.3, -0.7]]).requires_grad_()
    value = loss(features, torch.tensor([0, 2]))  # sample 1's class has no valid row: out of the mean
    torch.testing.assert_close(value, torch.tensor(math.log(1 + E ** -2)))
    value.backward()
    assert torch.equal(features.grad[1], torch.zeros(2))


def test_bct_fully_masked_batch_is_zero_not_nan():
    loss = BCTLoss(torch.eye(2), valid_mask=torch.tensor([True, False]))
    value = loss(torch.randn(3, 2), torch.tensor([1, 1, 1]))
    assert value.item() == 0.0


def test_bct_with_synthesised_classifier_targets_new_class_means():
    old_weight = _t([[1.0, 0.0], [0.0, 0.0]])  # class 1 never seen: untrained row
    weight, valid = synthesise_old_classifier(old_weight, torch.tensor([True, False]), _t([[0.0, 2.0]]),
                                              torch.tensor([1]))
    loss = BCTLoss(weight, scale=2.0, valid_mask=valid)
    torch.testing.assert_close(loss(_t([[0.0, 5.0]]), torch.tensor([1])), torch.tensor(math.log(1 + E ** -2)))


def test_bct_keeps_its_own_frozen_copy_of_the_old_classifier():
    old_classifier = nn.Linear(2, 2, bias=False)
    loss = BCTLoss(old_classifier.weight)  # a live Parameter, not detached
    with torch.no_grad():
        old_classifier.weight.mul_(3.0)  # the old model changing afterwards must not change the target
    assert not torch.equal(loss.old_weight, old_classifier.weight)
    loss(torch.randn(3, 2, requires_grad=True), torch.tensor([0, 1, 0])).backward()
    assert old_classifier.weight.grad is None


def test_bct_refuses_other_dims():
    with pytest.raises(ValueError, match="new feature dim 3 does not match old classifier dim 2"):
        BCTLoss(torch.eye(2))(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# --- l2 -------------------------------------------------------------------------------------------------------

def test_l2_on_normalised_features_by_hand():
    new = _t([[1.0, 0.0], [2.0, 0.0]])
    old = _t([[0.0, 3.0], [1.0, 0.0]])  # 90 degrees apart: 2; same direction, other norm: 0
    torch.testing.assert_close(L2Loss()(new, torch.tensor([0, 1]), ref_emb=old), torch.tensor(1.0))


def test_l2_refuses_mismatched_dims():
    with pytest.raises(ValueError, match="new feature dim 3 does not match old features dim 2"):
        L2Loss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), ref_emb=torch.randn(4, 2))
    with pytest.raises(ValueError, match="needs ref_emb"):
        L2Loss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# --- contrastive / ract ---------------------------------------------------------------------------------------

# labels (0, 0, 1); at tau = 0.5 a cosine c becomes the logit 2c.
NEW = _t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
OLD = _t([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
LABELS = torch.tensor([0, 0, 1])


def test_contrastive_by_hand_excludes_same_class_from_denominator():
    # i=0: pos cos 1, neg o2 cos 0 (o1 is same class: left out)
    # i=1: pos cos 1, neg o2 cos -1
    # i=2: pos cos 0, negs o0 cos -1, o1 cos 0
    expected = (math.log(1 + E ** -2) + math.log(1 + E ** -4) + math.log(2 + E ** -2)) / 3
    value = ContrastiveLoss(temperature=0.5)(NEW, LABELS, ref_emb=OLD)
    torch.testing.assert_close(value, torch.tensor(expected))


def test_ract_adds_new_to_new_negatives_of_other_classes():
    # on top of contrastive: i=0 gets n0.n2 = -1, i=1 gets n1.n2 = 0, i=2 gets n2.n0 = -1 and n2.n1 = 0
    expected = (math.log(1 + E ** -2 + E ** -4) + math.log(1 + E ** -4 + E ** -2) + math.log(3 + 2 * E ** -2)) / 3
    value = RACTLoss(temperature=0.5)(NEW, LABELS, ref_emb=OLD)
    torch.testing.assert_close(value, torch.tensor(expected))


@pytest.mark.parametrize("loss", [ContrastiveLoss(), RACTLoss()])
def test_contrastive_single_class_batch_is_zero(loss):
    value = loss(torch.randn(3, 2), torch.tensor([4, 4, 4]), ref_emb=torch.randn(3, 2))
    assert value.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", [ContrastiveLoss(), RACTLoss()])
def test_contrastive_refuses_mismatched_dims(loss):
    with pytest.raises(ValueError, match=f"{loss.name}: new feature dim 4 does not match old features dim 2"):
        loss(torch.randn(3, 4), LABELS, ref_emb=torch.randn(3, 2))


# --- scales: what one lambda means for each loss -------------------------------------------------------------

def _same_angles_in(dim, *blocks, seed=0):
    """The rows of each (n, 4) block embedded isometrically in R^dim: zero-padded, then one random rotation."""
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed),
                                              dtype=torch.float64))
    return [F.pad(block.double(), (0, dim - block.shape[1])) @ rotation for block in blocks]


@pytest.mark.parametrize("kind", ["bct", "l2", "contrastive", "ract"])
def test_compat_losses_depend_on_angles_not_on_the_embedding_dim(kind):
    torch.manual_seed(0)
    new, old, rows = torch.randn(12, 4), torch.randn(12, 4), torch.randn(3, 4)
    new = new * torch.rand(12, 1) * 10  # un-normalised features of any norm
    labels = torch.tensor([0, 1, 2] * 4)
    values = []
    for dim in (8, 512):
        n, o, w = _same_angles_in(dim, new, old, rows)
        loss = build_compat_loss(kind, old_weight=w) if kind == "bct" else build_compat_loss(kind)
        values.append(loss(n, labels, ref_emb=o))
    torch.testing.assert_close(values[0], values[1])


def test_l2_is_two_minus_two_cos_whatever_the_dim():
    angle = 1.0  # radians
    for dim in (8, 512):
        new, old = _same_angles_in(dim, _t([[1.0, 0.0, 0.0, 0.0]]) * 7.0,
                                   _t([[math.cos(angle), math.sin(angle), 0.0, 0.0]]))
        value = L2Loss()(new, torch.tensor([0]), ref_emb=old)
        torch.testing.assert_close(value, torch.tensor(2 - 2 * math.cos(angle), dtype=torch.float64))


def test_compat_losses_are_of_order_one_for_unrelated_features():
    # at initialisation new and old features are unrelated: l2 ~ 2, bct ~ log(C), contrastive ~ log(1 + K)
    torch.manual_seed(0)
    dim, classes = 512, 10
    old_weight = torch.randn(classes, dim)

    def values(n):
        new, old, labels = torch.randn(n, dim), torch.randn(n, dim), torch.arange(n) % classes
        negatives = n - n // classes  # other-class samples of each sample
        return ({kind: float(build_compat_loss(kind, **({"old_weight": old_weight} if kind == "bct" else {}))(
            new, labels, ref_emb=old)) for kind in ("bct", "l2", "contrastive", "ract")}, negatives)

    small, k_small = values(40)
    large, k_large = values(320)
    assert small["l2"] == pytest.approx(2.0, abs=0.05)
    assert small["bct"] == pytest.approx(math.log(classes), abs=0.3)
    assert small["contrastive"] == pytest.approx(math.log(1 + k_small), abs=0.3)
    # contrastive is the one whose value depends on the batch: it grows like log(batch size)
    assert large["contrastive"] - small["contrastive"] == pytest.approx(math.log((1 + k_large) / (1 + k_small)),
                                                                      abs=0.1)
    assert large["ract"] - small["ract"] == pytest.approx(math.log((1 + 2 * k_large) / (1 + 2 * k_small)), abs=0.1)
    assert large["l2"] == pytest.approx(small["l2"], abs=0.05)


# --- total loss, factory, gradients ---------------------------------------------------------------------------

class _Exploding(nn.Module):
    needs_ref_emb = True

    def forward(self, *args):
        raise AssertionError("compat must not be computed when lam == 0")


def test_lam_zero_is_exactly_independent_cross_entropy():
    torch.manual_seed(0)
    logits, features, labels = torch.randn(6, 4), torch.randn(6, 3), torch.randint(0, 4, (6,))
    out = CompatibleTrainingLoss(0.0, _Exploding())(logits, features, labels)
    assert torch.equal(out["total"], F.cross_entropy(logits, labels))
    assert out["compat"].item() == 0.0
    assert not CompatibleTrainingLoss(0.0, _Exploding()).needs_ref_emb


def test_lam_weights_the_compat_term_once():
    torch.manual_seed(0)
    logits, features, labels = torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    old = torch.randn(4, 2)
    out = CompatibleTrainingLoss(2.5, L2Loss())(logits, features, labels, ref_emb=old)
    compat = L2Loss()(features, labels, ref_emb=old)
    torch.testing.assert_close(out["compat"], compat)
    torch.testing.assert_close(out["total"], F.cross_entropy(logits, labels) + 2.5 * compat)


def test_total_loss_refuses_bad_lam():
    with pytest.raises(ValueError, match="lam must be >= 0"):
        CompatibleTrainingLoss(-1.0, L2Loss())
    with pytest.raises(ValueError, match="needs a compat loss"):
        CompatibleTrainingLoss(1.0, None)


def test_build_compat_loss():
    assert isinstance(build_compat_loss("ract", temperature=0.2), RACTLoss)
    assert build_compat_loss("bct", old_weight=torch.eye(2)).needs_ref_emb is False
    with pytest.raises(ValueError, match="unknown compat loss 'cosface'; valid kinds: bct, l2, contrastive, ract"):
        build_compat_loss("cosface")
    with pytest.raises(ValueError, match="invalid options.*'l2'"):
        build_compat_loss("l2", temperature=0.1)


@pytest.mark.parametrize("kind", ["bct", "l2", "contrastive", "ract"])
def test_gradient_reaches_only_the_new_model(kind):
    torch.manual_seed(0)
    new_model, old_model = nn.Linear(5, 3), nn.Linear(5, 3)
    old_classifier = nn.Linear(3, 4, bias=False)
    new_classifier = nn.Linear(3, 4, bias=False)
    x, labels = torch.randn(8, 5), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    kwargs = {"old_weight": old_classifier.weight.detach()} if kind == "bct" else {}
    loss = CompatibleTrainingLoss(1.0, build_compat_loss(kind, **kwargs))
    features = new_model(x)
    ref = old_model(x) if loss.needs_ref_emb else None  # deliberately not detached: the loss must not leak
    loss(new_classifier(features), features, labels, ref_emb=ref)["total"].backward()
    assert new_model.weight.grad.abs().sum() > 0
    assert old_model.weight.grad is None and old_classifier.weight.grad is None


# --- transform loss, NaN guard --------------------------------------------------------------------------------

def test_transform_loss_by_hand():
    psi_out, target = _t([[1.0, 0.0]]), _t([[0.0, 4.0]])
    weight, labels = torch.eye(2), torch.tensor([0])
    out = transform_loss(psi_out, target, labels, weight, "cosine", 2.0, alpha=0.5, beta=2.0)
    ce = math.log(1 + E ** -2)
    torch.testing.assert_close(out["ce"], torch.tensor(ce))
    torch.testing.assert_close(out["cos"], torch.tensor(1.0))
    torch.testing.assert_close(out["total"], torch.tensor(0.5 * ce + 2.0))
    cos_only = transform_loss(psi_out, target, labels, weight, "cosine", 2.0, alpha=0.0, beta=1.0)
    assert cos_only["ce"].item() == 0.0 and cos_only["total"].item() == pytest.approx(1.0)


def test_transform_loss_refuses_zero_weights_and_shape_mismatch():
    with pytest.raises(ValueError, match="not both 0"):
        transform_loss(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]), torch.eye(2), "cosine", 2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        transform_loss(torch.ones(1, 2), torch.ones(1, 3), torch.tensor([0]), torch.eye(2), "cosine", 2.0, 1.0, 1.0)


def test_check_finite():
    check_finite(torch.tensor(1.5), "step 3")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match="NaN/Inf loss at step 3"):
            check_finite(torch.tensor(bad), "step 3")
