"""Losses of BiCT (docs/METHOD.md): backward-compatible training of phi_{t+1} and the upgrade transform psi.

New model:  L = CE(omega_{t+1} phi_{t+1}(x), y) + lam * L_compat      (``CompatibleTrainingLoss``)
Transform:  L = alpha * CE(omega_{t+1} psi(s(x)), y) + beta * (1 - cos(psi(s(x)), phi_{t+1}(x)))  (``transform_loss``)

A compat loss is called like a pytorch-metric-learning loss, ``loss(embeddings, labels, ref_emb=None)``:
``embeddings`` (N, D) are the new model's un-normalised features, ``ref_emb`` (N, D) the frozen old model's
features of the *same* samples. ``needs_ref_emb`` says whether the old model must be run at all (``bct`` only
needs the old classifier). Everything from the old model (its classifier, its features) is treated as a constant:
the losses detach it, so no gradient can reach the old model.
Plain torch; no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bict_ray.core.models import CLASSIFIERS, classifier_logits
from bict_ray.errors import InputError


def synthesise_old_classifier(old_weight: torch.Tensor, seen: torch.Tensor, old_embeddings: torch.Tensor,
                              labels: torch.Tensor, classifier: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Extend the old classifier omega_t to classes the old model never saw (BCT's "pseudo old classifier").

    old_weight: (C, D) old classifier rows; seen: (C,) bool, classes phi_t trained on; old_embeddings: (N, D)
    phi_t features of the new training set (normalised or not: each is L2-normalised first, so the mean is
    a mean *direction*, what retrieval compares, not dominated by high-norm samples); labels: (N,) int64 in [0, C).

    Returns ``(weight, valid_mask)``, both detached: weight (C, D), where each unseen class with samples gets
    the L2-normalised mean of its samples' normalised old embeddings, and seen rows are unchanged;
    valid_mask (C,) bool marks rows usable as targets (seen, or synthesised). An unseen class with no samples
    keeps its (untrained) row and is marked invalid.

    For the ``linear`` classifier a row's norm acts as a per-class logit scale, so unit-norm synthesised rows
    beside seen rows of norm, say, 5 would never win the softmax and their CE would pull the new features
    towards them without bound; synthesised rows are therefore scaled to the mean norm of the seen rows.
    """
    if classifier not in CLASSIFIERS:
        raise InputError(f"unknown classifier {classifier!r}; valid kinds: {', '.join(CLASSIFIERS)}")
    if old_weight.dim() != 2:
        raise InputError(f"old_weight must be (C, D), got shape {tuple(old_weight.shape)}")
    num_classes, dim = old_weight.shape
    if seen.shape != (num_classes,) or seen.dtype != torch.bool:
        raise InputError(f"seen must be a ({num_classes},) bool tensor, got {seen.dtype} {tuple(seen.shape)}")
    if old_embeddings.dim() != 2 or old_embeddings.shape[1] != dim:
        raise InputError(f"old_embeddings must be (N, {dim}) to match old_weight, got {tuple(old_embeddings.shape)}")
    if labels.shape != (old_embeddings.shape[0],):
        raise InputError(f"labels must be ({old_embeddings.shape[0]},), got {tuple(labels.shape)}")
    _check_label_range(labels, num_classes, "synthesise_old_classifier")
    if classifier == "linear" and not seen.any():
        raise InputError("cannot synthesise linear classifier rows: the old model saw no class to take a norm from")

    with torch.no_grad():
        weight = old_weight.detach().clone()
        directions = F.normalize(old_embeddings.detach().to(weight.dtype), dim=1)
        sums = torch.zeros_like(weight).index_add_(0, labels, directions)
        has_samples = torch.bincount(labels, minlength=num_classes) > 0
        synthesise = ~seen & has_samples
        rows = F.normalize(sums[synthesise], dim=1)
        if classifier == "linear":
            rows = rows * weight[seen].norm(dim=1).mean()
        weight[synthesise] = rows
    return weight, seen | has_samples


class BCTLoss(nn.Module):
    """``bct``: CE(omega_hat_t phi_{t+1}(x), y) with omega_hat_t the frozen (possibly synthesised) old classifier.

    old_weight: (C, D_old), copied and detached. valid_mask: (C,) bool, rows usable as targets (default all);
    samples whose label row is invalid are left out of the mean (masking, as with
    ``compat.synthesise_new_classes: false``), and a batch with no usable sample gives a loss of 0. New features must
    have dim D_old.
    """

    needs_ref_emb = False
    needs_old_classifier = True

    def __init__(self, old_weight: torch.Tensor, classifier: str = "cosine", scale: float = 16.0,
                 valid_mask: torch.Tensor | None = None):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise InputError(f"unknown classifier {classifier!r}; valid kinds: {', '.join(CLASSIFIERS)}")
        if old_weight.dim() != 2:
            raise InputError(f"old_weight must be (C, D), got shape {tuple(old_weight.shape)}")
        if valid_mask is None:
            valid_mask = torch.ones(old_weight.shape[0], dtype=torch.bool)
        if valid_mask.shape != (old_weight.shape[0],) or valid_mask.dtype != torch.bool:
            raise InputError(f"valid_mask must be a ({old_weight.shape[0]},) bool tensor, "
                             f"got {valid_mask.dtype} {tuple(valid_mask.shape)}")
        self.classifier = classifier
        self.scale = float(scale)
        self.register_buffer("old_weight", old_weight.detach().clone())
        self.register_buffer("valid_mask", valid_mask.detach().clone())

    @classmethod
    def from_context(cls, context: CompatContext) -> BCTLoss:
        return cls(context.old_weight, context.classifier, context.scale, context.valid_mask)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        _check_dims("bct", "old classifier", embeddings, self.old_weight.shape[1])
        _check_label_range(labels, self.old_weight.shape[0], "bct")
        keep = self.valid_mask[labels]
        if not keep.any():
            return embeddings.new_zeros(())
        logits = classifier_logits(self.classifier, self.old_weight, embeddings[keep], self.scale)
        return F.cross_entropy(logits, labels[keep])


class L2Loss(nn.Module):
    """``l2``: mean over the batch of ||n_i - o_i||^2 on L2-normalised features (= 2 - 2 cos(n_i, o_i)).

    Normalised because retrieval compares normalised embeddings; the raw features' norms are irrelevant to it.
    Range [0, 4].
    """

    needs_ref_emb = True
    needs_old_classifier = False

    @classmethod
    def from_context(cls, context: CompatContext) -> L2Loss:
        return cls()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        new, old = _normalised_pair("l2", embeddings, ref_emb)
        return (new - old).pow(2).sum(dim=1).mean()


class ContrastiveLoss(nn.Module):
    """``contrastive``: InfoNCE from each new feature n_i to its own old feature o_i.

    loss_i = -log( e^{n_i.o_i/tau} / (e^{n_i.o_i/tau} + sum_{j: y_j != y_i} e^{n_i.o_j/tau}) ), features
    L2-normalised, mean over the batch. Other samples of the same class are left out of the denominator
    (they are not negatives). A sample with no other-class sample in the batch contributes 0.
    """

    name = "contrastive"
    needs_ref_emb = True
    needs_old_classifier = False
    new_to_new = False

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def from_context(cls, context: CompatContext) -> ContrastiveLoss:
        return cls(context.temperature)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        new, old = _normalised_pair(self.name, embeddings, ref_emb)
        if labels.shape != (new.shape[0],):
            raise InputError(f"{self.name}: labels must be ({new.shape[0]},), got {tuple(labels.shape)}")
        other_class = labels[:, None] != labels[None, :]
        # the positive o_i sits on the diagonal, which other_class excludes; put it back
        old_candidates = other_class | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = (new @ old.T).masked_fill(~old_candidates, -math.inf)
        if self.new_to_new:
            logits = torch.cat([logits, (new @ new.T).masked_fill(~other_class, -math.inf)], dim=1)
        target = torch.arange(len(labels), device=labels.device)
        return F.cross_entropy(logits / self.temperature, target)


class RACTLoss(ContrastiveLoss):
    """``ract`` (Hot-Refresh, Zhang et al. ICLR 2022): ``contrastive`` whose denominator also holds the
    new-to-new terms e^{n_i.n_j/tau} of other-class samples j, so new classes also spread apart in the new space.
    """

    name = "ract"
    new_to_new = True


# compat.loss -> its class. A compat loss is an nn.Module called as loss(embeddings, labels, ref_emb=None), with
# class attributes needs_ref_emb (run the old model on the batch?) and needs_old_classifier (synthesise the old
# classifier before training?) and a classmethod from_context(CompatContext). A new one is a class and a line here.
COMPAT_LOSSES: dict[str, type[nn.Module]] = {
    "bct": BCTLoss, "l2": L2Loss, "contrastive": ContrastiveLoss, "ract": RACTLoss}


@dataclass(frozen=True)
class CompatContext:
    """What the trainer has for a compat loss of phi_{t+1} against the frozen phi_t: the old classifier (C, D), with
    synthesised rows for classes phi_t never saw, its valid rows (C,) bool, its kind and scale (only computed when
    the loss ``needs_old_classifier``), and the configured temperature."""

    old_weight: torch.Tensor | None = None
    valid_mask: torch.Tensor | None = None
    classifier: str = "cosine"
    scale: float = 16.0
    temperature: float = 0.1


def compat_loss_for(kind: str, context: CompatContext) -> nn.Module:
    """The compat loss ``kind`` (a key of ``COMPAT_LOSSES``) built from what the trainer has."""
    if kind not in COMPAT_LOSSES:
        raise InputError(f"unknown compat loss {kind!r}; valid kinds: {', '.join(COMPAT_LOSSES)}")
    return COMPAT_LOSSES[kind].from_context(context)


def build_compat_loss(kind: str, **kwargs) -> nn.Module:
    """A compat loss by name: ``bct`` (kwargs old_weight, classifier, scale, valid_mask), ``l2`` (none),
    ``contrastive`` / ``ract`` (temperature)."""
    if kind not in COMPAT_LOSSES:
        raise InputError(f"unknown compat loss {kind!r}; valid kinds: {', '.join(COMPAT_LOSSES)}")
    try:
        return COMPAT_LOSSES[kind](**kwargs)
    except TypeError as exc:
        raise InputError(f"invalid options {sorted(kwargs)} for compat loss {kind!r}: {exc}") from exc


class CompatibleTrainingLoss(nn.Module):
    """L = CE(logits, y) + lam * compat(features, y, ref_emb): the loss of a backward-compatible new model.

    Returns ``{"total", "ce", "compat"}`` scalar tensors. lam is applied here and nowhere else. With lam == 0
    (independent training) compat is not computed, "compat" is 0 and "total" *is* the CE tensor.
    """

    def __init__(self, lam: float, compat: nn.Module | None):
        super().__init__()
        if not lam >= 0:
            raise InputError(f"lam must be >= 0, got {lam}")
        if lam > 0 and compat is None:
            raise InputError(f"lam = {lam} > 0 needs a compat loss, got None")
        self.lam = float(lam)
        self.compat = compat

    @property
    def needs_ref_emb(self) -> bool:
        """Whether the caller must run the old model to pass ``ref_emb``."""
        return self.lam > 0 and self.compat.needs_ref_emb

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """logits (N, C) and features (N, D) of the new model; labels (N,) global; ref_emb (N, D) old features."""
        ce = F.cross_entropy(logits, labels)
        if self.lam == 0:
            return {"total": ce, "ce": ce, "compat": ce.new_zeros(())}
        compat = self.compat(features, labels, ref_emb)
        return {"total": ce + self.lam * compat, "ce": ce, "compat": compat}


def transform_loss(psi_out: torch.Tensor, target_new_feat: torch.Tensor, labels: torch.Tensor,
                   new_classifier_weight: torch.Tensor, classifier_kind: str, scale: float,
                   alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """Loss of the upgrade transform psi: alpha * CE(omega_{t+1} psi(s), y) + beta * mean(1 - cos(psi(s), target)).

    psi_out: (N, D_new) psi applied to stored old embeddings; target_new_feat: (N, D_new) frozen new-model
    features (detached here); new_classifier_weight: (C, D_new) frozen omega_{t+1} (detached here).
    A term with weight 0 is skipped and reported as 0. Returns ``{"total", "ce", "cos"}``.
    """
    if alpha < 0 or beta < 0 or (alpha == 0 and beta == 0):
        raise InputError(f"alpha and beta must be >= 0 and not both 0, got alpha={alpha}, beta={beta}")
    if target_new_feat.shape != psi_out.shape:
        raise InputError(f"transform: psi output {tuple(psi_out.shape)} and new-model target "
                         f"{tuple(target_new_feat.shape)} differ in shape")
    ce = cos = psi_out.new_zeros(())
    if alpha > 0:
        _check_dims("transform", "new classifier", psi_out, new_classifier_weight.shape[1])
        logits = classifier_logits(classifier_kind, new_classifier_weight.detach(), psi_out, scale)
        ce = F.cross_entropy(logits, labels)
    if beta > 0:
        cos = (1 - F.cosine_similarity(psi_out, target_new_feat.detach(), dim=1)).mean()
    return {"total": alpha * ce + beta * cos, "ce": ce, "cos": cos}


def check_finite(loss_value: torch.Tensor | float, where: str) -> None:
    """Raise FloatingPointError("NaN/Inf loss at <where>") unless ``loss_value`` is finite (syncs a GPU tensor)."""
    value = float(loss_value.detach()) if isinstance(loss_value, torch.Tensor) else float(loss_value)
    if not math.isfinite(value):
        raise FloatingPointError(f"NaN/Inf loss at {where} (value {value})")


def _normalised_pair(name: str, embeddings: torch.Tensor,
                     ref_emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if ref_emb is None:
        raise InputError(f"{name}: needs ref_emb, the old model's features of the same samples")
    _check_dims(name, "old features", embeddings, ref_emb.shape[-1])
    if ref_emb.shape != embeddings.shape:
        raise InputError(f"{name}: new features {tuple(embeddings.shape)} and old features "
                         f"{tuple(ref_emb.shape)} differ in shape")
    return F.normalize(embeddings, dim=1), F.normalize(ref_emb.detach().to(embeddings.dtype), dim=1)


def _check_dims(name: str, other: str, embeddings: torch.Tensor, other_dim: int) -> None:
    if embeddings.dim() != 2:
        raise InputError(f"{name}: new features must be (N, D), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != other_dim:
        raise InputError(f"{name}: new feature dim {embeddings.shape[1]} does not match {other} dim {other_dim}; "
                         f"compatible training needs equal embedding dims")


def _check_label_range(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"{name}: labels must be in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
