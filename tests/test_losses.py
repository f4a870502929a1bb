"""Multi-label losses: reference equivalences, pos_weight, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfold.config import ConfigError, TrainConfig
from mmfold.errors import UserError
from mmfold.train.losses import LOSSES, build_loss, pos_weight_from_labels


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and sparse 0/1 targets ``(8, 5)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=g) * 3, (torch.rand(8, 5, generator=g) < 0.3).float()


def loss_of(name: str, pos_weight: torch.Tensor | None = None, **params: object) -> torch.nn.Module:
    """``build_loss`` from a TrainConfig."""
    return build_loss(TrainConfig(loss=name, loss_params=dict(params)), pos_weight)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains(name: str) -> None:
    logits, y = data()
    logits.requires_grad_(True)
    loss = loss_of(name)(logits, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    good, bad = loss_of(name)(20 * (2 * y - 1), y), loss_of(name)(-20 * (2 * y - 1), y)
    assert good < 1e-3 < bad


def test_registry_names() -> None:
    assert set(LOSSES) == {"bce", "focal", "asl", "multilabel_soft_margin"}


def test_bce_matches_torch_and_uses_pos_weight() -> None:
    logits, y = data()
    torch.testing.assert_close(loss_of("bce")(logits, y), F.binary_cross_entropy_with_logits(logits, y))
    pw = torch.linspace(1, 5, 5)
    loss = loss_of("bce", pw)
    torch.testing.assert_close(loss(logits, y), F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw))
    assert "pos_weight" in dict(loss.named_buffers())  # moves with .to(device)


def test_focal_reduces_to_bce_and_down_weights_easy() -> None:
    logits, y = data()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    torch.testing.assert_close(loss_of("focal", gamma=0.0, alpha=None)(logits, y), bce)
    assert loss_of("focal", gamma=2.0, alpha=None)(logits, y) < bce


def test_asl_reduces_to_bce_and_clips_easy_negatives() -> None:
    logits, y = data()
    plain = loss_of("asl", gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    torch.testing.assert_close(plain(logits, y), F.binary_cross_entropy_with_logits(logits, y))
    easy_negative = torch.tensor([[-4.0]])  # p = 0.018 < clip
    assert loss_of("asl", clip=0.05)(easy_negative, torch.zeros(1, 1)) == 0
    hard_negative = torch.tensor([[2.0]])
    assert loss_of("asl")(hard_negative, torch.zeros(1, 1)) > 0


def test_soft_margin_matches_torch() -> None:
    logits, y = data()
    torch.testing.assert_close(loss_of("multilabel_soft_margin")(logits, y),
                               torch.nn.MultiLabelSoftMarginLoss()(logits, y))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_logits_give_float32_loss(name: str) -> None:
    logits, y = data()
    assert loss_of(name)(logits.half(), y).dtype == torch.float32


def test_build_loss_errors() -> None:
    with pytest.raises(UserError, match="unknown loss 'nope'"):
        loss_of("nope")
    with pytest.raises(ConfigError, match=r"\['gama'\] unknown for loss 'focal'; valid: \['gamma', 'alpha'\]"):
        loss_of("focal", gama=2)
    with pytest.raises(ConfigError, match="only used by loss 'bce'"):
        loss_of("asl", torch.ones(5))


def test_pos_weight_from_labels() -> None:
    y = np.zeros((100, 4), dtype=np.uint8)
    y[:50, 0] = 1  # balanced -> 1
    y[:10, 1] = 1  # 90/10 -> 9
    y[:, 3] = 1  # all positive -> clipped to 1/clip
    w = pos_weight_from_labels(y, clip=5.0)
    assert w.dtype == torch.float32 and w.shape == (4,)
    torch.testing.assert_close(w, torch.tensor([1.0, 5.0, 5.0, 0.2]))
    assert pos_weight_from_labels(y, clip=100.0)[1] == pytest.approx(9.0)
