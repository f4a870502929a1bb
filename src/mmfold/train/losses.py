"""Multi-label losses on logits ``(B, L)`` and 0/1 targets, chosen by ``train.loss``.

Every loss returns the mean over all ``B * L`` label decisions, so switching loss keeps the
gradient scale (and hence a tuned learning rate) roughly where it was. All of them compute in
float32 even under AMP: ``log(sigmoid)`` of half-precision logits underflows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmfold.config import ConfigError, TrainConfig
from mmfold.registry import Registry

LOSSES = Registry("loss")


class BCELoss(nn.Module):
    """Binary cross-entropy per label; ``pos_weight`` (L,) up-weights rare labels' positives."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean BCE."""
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(),
                                                  pos_weight=self.pos_weight)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017): easy, confident decisions contribute little.

    Args:
        gamma: Focusing exponent; 0 gives (alpha-weighted) BCE.
        alpha: Weight of positives (negatives get ``1 - alpha``); None weighs both as 1.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean focal loss."""
        x, y = logits.float(), target.float()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = torch.exp(-ce)  # probability given to the true answer
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        return loss.mean()


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al. 2021): focus harder on negatives and discard very easy ones.

    Multi-label data has many more negatives than positives; ASL down-weights easy negatives
    with its own exponent ``gamma_neg`` and shifts negative probabilities down by ``clip``
    (``p_m = max(p - clip, 0)``), which zeroes the loss of negatives below ``clip`` and
    tolerates some mislabelled negatives.

    Args:
        gamma_neg: Focusing exponent for negatives.
        gamma_pos: Focusing exponent for positives.
        clip: Probability margin for negatives (0 disables it).
        eps: Floor inside the logarithm.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05,
                 eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean ASL."""
        x, y = logits.float(), target.float()
        p = torch.sigmoid(x)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        pos = y * F.logsigmoid(x) * (1 - p) ** self.gamma_pos
        neg = (1 - y) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg ** self.gamma_neg
        return -(pos + neg).mean()


class SoftMarginLoss(nn.Module):
    """``nn.MultiLabelSoftMarginLoss``: BCE averaged per sample, then over the batch."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean soft-margin loss."""
        return F.multilabel_soft_margin_loss(logits.float(), target.float())


@LOSSES.register("bce")
def bce(pos_weight: torch.Tensor | None = None) -> nn.Module:
    """:class:`BCELoss`; the only loss that uses ``train.pos_weight``."""
    return BCELoss(pos_weight)


@LOSSES.register("focal")
def focal(pos_weight: torch.Tensor | None = None, gamma: float = 2.0,
          alpha: float | None = 0.25) -> nn.Module:
    """:class:`FocalLoss`."""
    _no_pos_weight("focal", pos_weight)
    return FocalLoss(gamma, alpha)


@LOSSES.register("asl")
def asl(pos_weight: torch.Tensor | None = None, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
        clip: float = 0.05, eps: float = 1e-8) -> nn.Module:
    """:class:`AsymmetricLoss`."""
    _no_pos_weight("asl", pos_weight)
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, eps)


@LOSSES.register("multilabel_soft_margin")
def multilabel_soft_margin(pos_weight: torch.Tensor | None = None) -> nn.Module:
    """:class:`SoftMarginLoss`."""
    _no_pos_weight("multilabel_soft_margin", pos_weight)
    return SoftMarginLoss()


def _no_pos_weight(name: str, pos_weight: torch.Tensor | None) -> None:
    """Refuse ``train.pos_weight`` for a loss that would silently ignore it."""
    if pos_weight is not None:
        raise ConfigError(f"train.pos_weight is only used by loss 'bce', not '{name}' "
                          "(focal/asl re-weight labels through their own parameters)")


def build_loss(train_cfg: TrainConfig, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss named by ``train.loss`` with ``train.loss_params``.

    Args:
        train_cfg: ``loss`` and ``loss_params``.
        pos_weight: Per-label positive weights from :func:`pos_weight_from_labels` (training
            fold only), or None.

    Raises:
        ConfigError: unknown loss, unknown parameter, or ``pos_weight`` for a loss without it.
    """
    fn = LOSSES.get(train_cfg.loss)
    _check_params(train_cfg.loss, fn, train_cfg.loss_params)
    return fn(pos_weight=pos_weight, **train_cfg.loss_params)


def _check_params(name: str, fn: Callable[..., nn.Module], params: dict) -> None:
    """Name the valid ``train.loss_params`` keys when one is unknown."""
    valid = [k for k in inspect.signature(fn).parameters if k != "pos_weight"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"train.loss_params {unknown} unknown for loss '{name}'; valid: {valid}")


def pos_weight_from_labels(y: np.ndarray, clip: float = 10.0) -> torch.Tensor:
    """``negatives / positives`` per label, clipped to ``[1/clip, clip]``.

    Computed from the *training fold's* label matrix, so the validation fold's frequencies
    never leak into training. The clip keeps a label with 2 positives in 10k rows from
    dominating the loss (and a label with none from producing an infinite weight).

    Args:
        y: 0/1 labels ``(n, L)``.
        clip: Largest weight.

    Returns:
        float32 tensor ``(L,)``.
    """
    y = np.asarray(y, dtype=np.float64)
    pos = y.sum(axis=0)
    neg = y.shape[0] - pos
    w = neg / np.maximum(pos, 1.0)
    return torch.from_numpy(np.clip(w, 1.0 / clip, clip).astype(np.float32))
