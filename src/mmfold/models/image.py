"""Image side: any timm backbone by name, and the ``image`` kind (backbone + multi-label head)."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from mmfold.config import Config, ConfigError
from mmfold.models.base import (MODELS, MLPHead, ModelParams, MultiLabelModel, parse_params,
                                project_path, require)
from mmfold.models.pretrained import load_pretrained

log = logging.getLogger(__name__)


def create_timm(name: str, image_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``, never downloading.

    Models with a fixed input size (ViTs) are built for ``image_size`` when it is set; CNNs
    take any size and refuse the ``img_size`` argument, so it is only passed to those that
    accept it.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:10]
        raise ConfigError(f"timm has no model '{name}'; similar: {close}")
    base = {**kwargs, "pretrained": False, "num_classes": 0}
    if image_size:
        try:
            return timm.create_model(name, img_size=image_size, **base)
        except TypeError:
            pass
    try:
        return timm.create_model(name, **base)
    except TypeError as e:
        raise ConfigError(f"timm '{name}' rejects model.params.timm_kwargs {kwargs}: {e}") from e


def data_config(model: nn.Module, image_size: int | None,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's preprocessing for ``model``, then ``model.params.data_config`` overrides, then
    ``train.image_size`` as the input size."""
    cfg = dict(resolve_model_data_config(model))
    unknown = sorted(set(overrides or {}) - set(cfg))
    if unknown:
        raise ConfigError(f"model.params.data_config keys {unknown} unknown; valid: {sorted(cfg)}")
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()})
    if image_size:
        cfg["input_size"] = (cfg["input_size"][0], image_size, image_size)
    return cfg


class ImageEncoder(nn.Module):
    """A timm backbone that yields a pooled vector or a sequence of feature tokens.

    Attributes:
        model: The timm model (``num_classes=0``).
        out_dim: Width of the pooled vector (a few timm models widen it after pooling).
        token_dim: Width of the feature map / tokens.
        data_config: Preprocessing for the dataset (see :func:`data_config`).
    """

    is_backbone = True

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.token_dim: int = model.num_features
        self.out_dim: int = getattr(model, "head_hidden_size", None) or model.num_features
        self.data_config = data_config(model, image_size, overrides)
        self._nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: ``(B, C, H, W)`` for CNNs, ``(B, N, D)`` for token models."""
        f = self.model.forward_features(x)
        return f.permute(0, 3, 1, 2) if self._nhwc and f.ndim == 4 else f

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooling (global average, CLS token...) -> ``(B, out_dim)``."""
        if self._nhwc and feats.ndim == 4:
            feats = feats.permute(0, 2, 3, 1)
        return self.model.forward_head(feats, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, out_dim)``."""
        return self.pool(self.features(x))


def build_image_encoder(p: ModelParams, image_size: int | None, kind: str) -> ImageEncoder:
    """The timm backbone named in ``params.backbone``, with local weights if given."""
    model = create_timm(require(p.backbone, "backbone", kind), image_size, p.timm_kwargs)
    if p.pretrained_file:
        result = load_pretrained(model, project_path(p.pretrained_file), strict=p.pretrained_strict)
        log.info("image backbone %s: %s", p.backbone, result.summary())
    return ImageEncoder(model, image_size, p.data_config)


@MODELS.register("image")
class ImageModel(MultiLabelModel):
    """Any timm backbone + :class:`MLPHead`.

    Params: ``backbone``, ``pretrained_file``, ``pretrained_strict``, ``timm_kwargs``,
    ``data_config``, ``hidden`` (0 = linear head, the usual fine-tuning setup), ``dropout``.
    """

    needs_image = True

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(classes)
        p = parse_params(cfg)
        self.add_encoder("image", build_image_encoder(p, cfg.train.image_size, "image"))
        self.image_data_config = self.encoder("image").data_config
        self.head = MLPHead(self.encoder("image").out_dim, len(classes), p.hidden, p.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from the pooled image embedding."""
        return self.head(self.encoder("image")(batch["image"]))
