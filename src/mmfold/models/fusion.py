"""Image + caption models: late fusion by concatenation, and a cross-modal Transformer hybrid.

Either image side is any timm backbone; either text side is a Hugging Face encoder (``hf``) or
the BiLSTM (``lstm``), chosen by ``model.params.text_encoder``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfold.config import Config, ConfigError
from mmfold.models.base import MODELS, HybridParams, MLPHead, MultiLabelModel, parse_params
from mmfold.models.image import build_image_encoder
from mmfold.models.text import build_text_encoder


class FusionBase(MultiLabelModel):
    """Adds the ``image`` and ``text`` encoders named by the params."""

    needs_image = True
    needs_text = True
    default_text_encoder = "hf"

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(classes)
        self.params = p = parse_params(cfg)
        self.add_encoder("image", build_image_encoder(p, cfg.train.image_size, cfg.model.kind))
        self.add_encoder("text", build_text_encoder(p, self.default_text_encoder, cfg.model.kind))
        self.image_data_config = self.encoder("image").data_config


@MODELS.register("fusion")
class ConcatFusionModel(FusionBase):
    """Late fusion: pooled image and caption embeddings, each layer-normed, concatenated
    into an MLP head (the ResNet-18 + BERT baseline).

    The LayerNorms put a CNN's large unnormalised features and a text encoder's embedding on
    one scale, so neither modality drowns the other at initialisation.

    Params: image (``backbone``, ``pretrained_file``...), text (``text_encoder``,
    ``text_model``, ``pooling`` or ``lstm``), head (``hidden``, ``dropout``).
    """

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(cfg, classes)
        di, dt = self.encoder("image").out_dim, self.encoder("text").out_dim
        self.norm_image, self.norm_text = nn.LayerNorm(di), nn.LayerNorm(dt)
        self.head = MLPHead(di + dt, len(classes), self.params.hidden, self.params.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from ``[norm(image_emb), norm(text_emb)]``."""
        img = self.norm_image(self.encoder("image").encode(batch))
        txt = self.norm_text(self.encoder("text").encode(batch))
        return self.head(torch.cat([img, txt], dim=1))


class CrossModalTransformer(nn.Module):
    """A small pre-norm Transformer over ``[CLS] + image tokens + caption tokens``.

    Image feature maps are pooled to ``grid x grid`` tokens with learned positions (a CNN map
    has no positional signal of its own once flattened); token outputs of ViT-like backbones
    already carry positions and are used as they are. Learned modality embeddings tell the
    two kinds of token apart. Padding caption tokens are masked out of attention.
    """

    def __init__(self, image_dim: int, text_dim: int, hp: HybridParams) -> None:
        super().__init__()
        if hp.dim % hp.heads:
            raise ConfigError(f"model.params.hybrid.dim={hp.dim} must be a multiple of heads={hp.heads}")
        self.grid = hp.grid
        self.proj_image, self.proj_text = nn.Linear(image_dim, hp.dim), nn.Linear(text_dim, hp.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, hp.dim))
        self.modality = nn.Parameter(torch.zeros(2, hp.dim))
        self.grid_pos = nn.Parameter(torch.zeros(1, hp.grid * hp.grid, hp.dim))
        for t in (self.cls, self.modality, self.grid_pos):
            nn.init.trunc_normal_(t, std=0.02)
        layer = nn.TransformerEncoderLayer(hp.dim, hp.heads, 4 * hp.dim, hp.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, hp.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hp.dim)
        self.out_dim = hp.dim

    def image_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` maps or ``(B, N, C)`` tokens -> ``(B, N', dim)``."""
        if feats.ndim == 4:
            feats = F.adaptive_avg_pool2d(feats, self.grid).flatten(2).transpose(1, 2)
            return self.proj_image(feats) + self.grid_pos + self.modality[0]
        return self.proj_image(feats) + self.modality[0]

    def forward(self, feats: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The fused ``[CLS]`` state ``(B, dim)``."""
        img = self.image_tokens(feats)
        txt = self.proj_text(text) + self.modality[1]
        cls = self.cls.expand(img.shape[0], -1, -1)
        keep = torch.ones(img.shape[0], 1 + img.shape[1], dtype=torch.bool, device=mask.device)
        pad = ~torch.cat([keep, mask.bool()], dim=1)
        out = self.encoder(torch.cat([cls, img, txt], dim=1), src_key_padding_mask=pad)
        return self.norm(out[:, 0])


@MODELS.register("hybrid")
class HybridFusionModel(FusionBase):
    """Image feature tokens and caption tokens attend to each other before the head.

    With ``text_encoder: lstm`` this is the CNN + LSTM + Transformer hybrid.

    Params: as :class:`ConcatFusionModel`, plus ``hybrid`` {``dim``, ``layers``, ``heads``,
    ``grid``, ``dropout``}.
    """

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(cfg, classes)
        image, text = self.encoder("image"), self.encoder("text")
        self.fusion = CrossModalTransformer(image.token_dim, text.token_dim, self.params.hybrid)
        self.head = MLPHead(self.fusion.out_dim, len(classes), self.params.hidden, self.params.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from the fused ``[CLS]`` token."""
        feats = self.encoder("image").features_of(batch)
        fused = self.fusion(feats, self.encoder("text").tokens_of(batch), batch["attention_mask"])
        return self.head(fused)
