"""Losses of BiCT (docs/METHOD.md): backward-compatible training of phi_{t+1} and the upgrade transform psi.

New model:  L = CE(omega_{t+1} phi_{t+1}(x), y) + lam * L_compat      (``CompatibleTrainingLoss``)
Transform:  L = alpha * CE(omega_{t+1} psi(s(x)), y) + beta * (1 - cos(psi(s(x)), phi_{t+1}(x)))  (``transform_loss``)

A compat loss is called like a pytorch-metric-learning loss, ``loss(embeddings, labels, ref_emb=None)``:
``embeddings`` (N, D) are the new model's un-normalised features, ``ref_emb`` (N, D) the frozen old model's
features of the *same* samples. ``needs_ref_emb`` says whether the old model must be run at all (``bct`` only
needs the old classifier). Everything from the old model (its classifier, its features) is treated as a constant:
the losses detach it, so no gradient can reach the old model.

Classifier rows of classes a model did not train on are kept out of every softmax (``masked_cross_entropy``): the
model's own CE and psi's CE see only that model's training classes, ``bct`` only the old classifier's valid rows.

Scales: every compat loss is a mean over samples of a per-sample term that depends on the features only through
cosines, so its value does not change with the embedding dim D, and is of order 1 at initialisation; one lam means
a comparable strength for each (docs/METHOD.md, "How strong lam is"). Under DDP (``torch.distributed`` initialised,
world size > 1) ``contrastive`` and ``ract`` take their negatives from the batches of all workers
(``all_gather_rows``), so a run on W workers of batch B computes the loss of one batch of W * B.
Plain torch (``torch.distributed`` included); no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bict_ray.core.models import CLASSIFIERS, classifier_logits
from bict_ray.errors import InputError


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_mask: torch.Tensor | None = None,
                         name: str = "cross-entropy") -> torch.Tensor:
    """Mean CE of ``logits`` (N, C) against ``labels`` (N,) int64, over the classes of ``class_mask`` (C,) bool only.

    The logits of masked-out classes are set to -inf before the softmax, so those classes take no probability, and
    their logits, hence their classifier rows, get a gradient of exactly 0: a class the model does not train on is
    neither a target nor pushed away. ``class_mask`` None: all C classes (plain ``F.cross_entropy``). Every label
    must be an allowed class; ``name`` is the loss that the error messages name.
    """
    if class_mask is None:
        return F.cross_entropy(logits, labels)
    if logits.dim() != 2 or class_mask.shape != (logits.shape[1],) or class_mask.dtype != torch.bool:
        raise InputError(f"{name}: class mask must be a (C,) bool tensor for logits (N, C), got mask "
                         f"{class_mask.dtype} {tuple(class_mask.shape)} and logits {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise InputError(f"{name}: labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
    _check_label_range(labels, logits.shape[1], name)
    class_mask = class_mask.to(logits.device)
    if labels.numel() and not bool(class_mask[labels].all()):
        outside = sorted(set(labels[~class_mask[labels]].tolist()))
        raise InputError(f"{name}: labels {outside} are classes outside the class mask "
                         f"(allowed: {torch.nonzero(class_mask).flatten().tolist()})")
    return F.cross_entropy(logits.masked_fill(~class_mask, -math.inf), labels)


def all_gather_rows(*tensors: torch.Tensor, differentiable: bool = False) -> tuple[list[torch.Tensor], int]:
    """The rows of each tensor from every worker of the default process group, concatenated in rank order, and
    the offset of this worker's own rows in them.

    tensors: each (n, ...) with the same n on one worker; n may differ between workers (a smaller last batch):
    the sizes are gathered first, each tensor is padded to the largest n for the collective, and the padding is
    dropped again. ``differentiable``: gradients of the gathered rows flow back to the worker that holds them
    (``torch.distributed.nn.functional.all_gather``, whose backward sums them over workers); otherwise the result
    is detached. Without an initialised process group, or with world size 1, returns the tensors as they are and
    offset 0. Every worker of the group must call it, with the same number of tensors of the same trailing shapes.
    """
    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors), 0
    n = tensors[0].shape[0]
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise InputError(f"all_gather_rows: tensors must have the same number of rows, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = torch.cat([tensor, tensor.new_zeros((largest - n, *tensor.shape[1:]))]).contiguous()
        if differentiable:
            # imported here: builds of torch without distributed support have no torch.distributed.nn
            from torch.distributed.nn.functional import all_gather

            parts = all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded.detach())
        gathered.append(torch.cat([part[:rows] for part, rows in zip(parts, sizes)]))
    return gathered, sum(sizes[:rank])


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

    old_weight: (C, D_old), copied and detached. valid_mask: (C,) bool, rows usable as targets (default all): the
    classes phi_t trained on plus those given a synthesised row. Invalid rows (untrained) are out of the softmax,
    and samples whose label row is invalid are left out of the mean (as with ``compat.synthesise_new_classes:
    false``); a batch with no usable sample gives a loss of 0. New features must have dim D_old.

    Scale: a per-sample mean of -log p_y; with the ``cosine`` classifier it depends on the features only through
    cosines (not on D), is about log(#valid rows) for features unrelated to the rows, and is bounded by
    log(1 + (#valid - 1) e^{2 s}) (s the scale). With ``linear`` the logits scale with the feature norms.
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
        return masked_cross_entropy(logits, labels[keep], self.valid_mask, "bct")


class L2Loss(nn.Module):
    """``l2``: mean over the batch of ||n_i - o_i||^2 on L2-normalised features (= 2 - 2 cos(n_i, o_i)).

    Normalised because retrieval compares normalised embeddings; the raw features' norms are irrelevant to it.
    Range [0, 4], about 2 for unrelated features. The sum over the D dimensions is what makes it independent of D:
    for unit vectors it is 2 - 2 cos whatever D is, where a mean over dimensions would shrink like 1/D.
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

    Under DDP the j run over the batches of all workers (``all_gather_rows``; the old features need no gradient),
    so W workers of batch B compute the loss of one batch of W * B: the mean over workers of their losses is that
    loss, and the gradient DDP averages is its gradient (with equal batches, as ``drop_last`` makes them).

    Scale: depends on the features only through cosines (not on D), range [0, log(1 + K e^{2/tau})] with K the
    negatives of a sample, about log(1 + K) for unrelated features: it grows like log(global batch size).
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
        (all_old, all_labels), offset = all_gather_rows(old, labels)
        target = offset + torch.arange(len(labels), device=labels.device)  # o_i's row among all workers' rows
        other_class = labels[:, None] != all_labels[None, :]
        # the positive o_i is of the same class, which other_class excludes; put it back
        old_candidates = other_class.clone()
        old_candidates[torch.arange(len(labels), device=labels.device), target] = True
        logits = (new @ all_old.T).masked_fill(~old_candidates, -math.inf)
        if self.new_to_new:
            (all_new,), _ = all_gather_rows(new, differentiable=True)
            logits = torch.cat([logits, (new @ all_new.T).masked_fill(~other_class, -math.inf)], dim=1)
        return F.cross_entropy(logits / self.temperature, target)


class RACTLoss(ContrastiveLoss):
    """``ract`` (Hot-Refresh, Zhang et al. ICLR 2022): ``contrastive`` whose denominator also holds the
    new-to-new terms e^{n_i.n_j/tau} of other-class samples j, so new classes also spread apart in the new space.

    Under DDP the new features of the other workers are gathered with their gradient, so the term n_i.n_j also
    trains worker j's model replica. Scale as ``contrastive``, with twice as many terms in the denominator.
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

    class_mask: (C,) bool, the classes the model trains on (its split's classes); the CE's softmax runs over those
    only (``masked_cross_entropy``), so the rows of classes it never sees are left as they are instead of being
    pushed away from every feature. None: all C classes. Returns ``{"total", "ce", "compat"}`` scalar tensors.
    lam is applied here and nowhere else. With lam == 0 (independent training) compat is not computed, "compat"
    is 0 and "total" *is* the CE tensor.
    """

    def __init__(self, lam: float, compat: nn.Module | None, class_mask: torch.Tensor | None = None):
        super().__init__()
        if not lam >= 0:
            raise InputError(f"lam must be >= 0, got {lam}")
        if lam > 0 and compat is None:
            raise InputError(f"lam = {lam} > 0 needs a compat loss, got None")
        if class_mask is not None and (class_mask.dim() != 1 or class_mask.dtype != torch.bool):
            raise InputError(f"class_mask must be a (C,) bool tensor, got {class_mask.dtype} "
                             f"{tuple(class_mask.shape)}")
        self.lam = float(lam)
        self.compat = compat
        self.register_buffer("class_mask", None if class_mask is None else class_mask.detach().clone())

    @property
    def needs_ref_emb(self) -> bool:
        """Whether the caller must run the old model to pass ``ref_emb``."""
        return self.lam > 0 and self.compat.needs_ref_emb

    def forward(self, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                ref_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """logits (N, C) and features (N, D) of the new model; labels (N,) global; ref_emb (N, D) old features."""
        ce = masked_cross_entropy(logits, labels, self.class_mask, "model cross-entropy")
        if self.lam == 0:
            return {"total": ce, "ce": ce, "compat": ce.new_zeros(())}
        compat = self.compat(features, labels, ref_emb)
        return {"total": ce + self.lam * compat, "ce": ce, "compat": compat}


def transform_loss(psi_out: torch.Tensor, target_new_feat: torch.Tensor, labels: torch.Tensor,
                   new_classifier_weight: torch.Tensor, classifier_kind: str, scale: float,
                   alpha: float, beta: float, class_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss of the upgrade transform psi: alpha * CE(omega_{t+1} psi(s), y) + beta * mean(1 - cos(psi(s), target)).

    psi_out: (N, D_new) psi applied to stored old embeddings; target_new_feat: (N, D_new) frozen new-model
    features (detached here); new_classifier_weight: (C, D_new) frozen omega_{t+1} (detached here); class_mask:
    (C,) bool, the classes phi_{t+1} trained on, the only rows in the CE's softmax (None: all C; the other rows
    are untrained). A term with weight 0 is skipped and reported as 0. Returns ``{"total", "ce", "cos"}``.
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
        ce = masked_cross_entropy(logits, labels, class_mask, "transform")
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
