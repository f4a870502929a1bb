"""The :class:`MultiLabelModel` interface, the model registry and the pieces every kind shares.

A model kind is a :class:`MultiLabelModel` subclass (or a function ``(cfg, classes) ->
MultiLabelModel``) registered with ``@MODELS.register("kind")``. ``configs/models/<name>.yaml``
selects it with ``model.kind`` and passes ``model.params``, which :func:`parse_params` turns
into a typed :class:`ModelParams` so that a typo in a YAML key is an error, not a silently
ignored default.

Parameters are split into two groups for the engine:

* **backbone**: the encoders that can come pretrained (timm image models, Hugging Face text
  encoders). They get ``train.backbone_lr_mult`` and are frozen for
  ``train.freeze_backbone_epochs``.
* **head**: everything learned from scratch (MLP heads, projections, the fusion Transformer,
  the embedding + BiLSTM caption encoder), at the full learning rate.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmfold import paths
from mmfold.config import Config, ConfigError, merge
from mmfold.registry import Registry

MODELS = Registry("model kind")

# Whether encoders being built load their pretrained weights. Predicting turns it off: a fold's
# best.pt holds every weight, so rebuilding the architecture must not read (or wait on) the hub.
_LOAD_PRETRAINED = contextvars.ContextVar("load_pretrained", default=True)


@contextlib.contextmanager
def pretrained_loading(flag: bool) -> Iterator[None]:
    """Build models inside with (``True``) or without (``False``) their pretrained weights."""
    token = _LOAD_PRETRAINED.set(flag)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


def loads_pretrained() -> bool:
    """Whether an encoder built now should load its pretrained weights."""
    return _LOAD_PRETRAINED.get()


@dataclass
class PretrainedNote:
    """What an encoder loaded, for the fold-start console line and ``done.json``.

    Attributes:
        what: ``image backbone resnet18`` / ``text model bert-base-uncased``.
        record: :meth:`mmfold.hub.Resolved.record` of the weights, None at random init.
        source: One line: where from (``hub timm/x@1a2b3c4d (model.safetensors)``, ``local ...``).
        loaded: Tensors copied from the weights.
        left: Tensors left at their initialisation (named in :attr:`left_names`).
        left_names: A few of them.
    """

    what: str
    record: dict[str, str] | None = None
    source: str = "random init (model.params.pretrained: false)"
    loaded: int = 0
    left: int = 0
    left_names: list[str] = field(default_factory=list)

    def line(self) -> str:
        """``image backbone x: hub timm/x@1a2b3c4d (model.safetensors), 152 tensors loaded, 0 left at init``."""
        if self.record is None:
            return f"{self.what}: {self.source}"
        left = f", e.g. {self.left_names[:3]}" if self.left_names else ""
        return f"{self.what}: {self.source}, {self.loaded} tensors loaded, {self.left} left at init{left}"


@dataclass
class LSTMParams:
    """Options of the embedding + BiLSTM caption encoder (``model.params.lstm``).

    Attributes:
        embed_dim: Word embedding width.
        hidden: LSTM hidden size per direction (the encoder outputs ``2 * hidden``).
        layers: Stacked LSTM layers.
        vocab_size: Capacity of the word vocabulary, including ``<pad>`` and ``<unk>``. The
            embedding table has this many rows whatever the fold's vocabulary, so the model can
            be built before the tokenizer is fitted; the tokenizer keeps the most frequent words.
        min_freq: A word must occur this often in the fold's training captions to get an id.
        dropout: Dropout on embeddings and between LSTM layers.
    """

    embed_dim: int = 128
    hidden: int = 128
    layers: int = 1
    vocab_size: int = 20000
    min_freq: int = 1
    dropout: float = 0.1


@dataclass
class HybridParams:
    """Options of the cross-modal Transformer of the ``hybrid`` kind (``model.params.hybrid``).

    Attributes:
        dim: Token width inside the fusion Transformer.
        layers: Transformer encoder layers.
        heads: Attention heads (must divide ``dim``).
        grid: CNN feature maps are average-pooled to at most ``grid x grid`` tokens, which
            bounds the cost of attention and fixes the size of the learned positions.
        dropout: Dropout inside the Transformer.
    """

    dim: int = 256
    layers: int = 2
    heads: int = 4
    grid: int = 7
    dropout: float = 0.1


@dataclass
class ModelParams:
    """Every ``model.params`` key a built-in kind understands; each kind uses a subset.

    Attributes:
        backbone: timm model name as timm writes it, with or without its pretrained tag
            (``resnet18``, ``convnext_nano.in12k_ft_in1k``, ``efficientnet_b0.ra_in1k``).
        pretrained: Load the backbone's pretrained weights (timm's own ones, from the Hugging
            Face cache, or ``pretrained_file``). Training from random init needs ``false``
            written out: a backbone never starts from random weights silently.
        revision: Hub branch, tag or commit of the weights (image and text side); None is
            ``main``. Each fold records the commit it resolved to.
        pretrained_file: Local ``.safetensors``/``.pth`` for the timm backbone, relative to the
            project root (what a mounted Kaggle dataset gives; ``make weights`` writes
            ``weights/efficientnet_lite0.safetensors``). Wins over the hub weights.
        pretrained_strict: Refuse to start when backbone weights are missing from that file.
        timm_kwargs: Extra keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).
        data_config: Overrides of timm's preprocessing (``mean``, ``std``, ``interpolation``,
            ``crop_pct``...) for weights trained with another normalisation than the timm
            model's default (the efficientnet-lite0 package expects ``mean=std=0.5``-ish).
        text_model: A Hugging Face repo id (``microsoft/deberta-v3-base``, read from the hub
            cache, at ``revision``) or a local model folder (config, weights, tokenizer),
            relative to the project root, e.g. ``weights/minilm``; the tokenizer comes from the
            same place.
        pooling: How HF token states become one vector: ``cls`` or ``mean`` (masked).
        text_encoder: Text side of a fusion kind: ``hf`` or ``lstm``. None = the kind's default.
        train_blocks: Image side: only the last N stages of the timm backbone (and its head
            convolution) train; the stem and earlier stages stay frozen at their pretrained
            weights, so their output is computed once per dataset and cached (with the
            horizontally flipped image, the one augmentation that survives caching). None
            fine-tunes the whole backbone. What makes fine-tuning affordable on a CPU.
        train_layers: Text side: only the top N Transformer layers of the Hugging Face encoder
            train; the embeddings and lower layers stay frozen and their token states are
            cached once per dataset. None fine-tunes every layer.
        hidden: Width of the MLP head's hidden layer; 0 makes the head a single linear layer.
        dropout: Dropout before each head layer.
        lstm: :class:`LSTMParams`.
        hybrid: :class:`HybridParams`.
    """

    backbone: str | None = None
    pretrained: bool = True
    revision: str | None = None
    pretrained_file: str | None = None
    pretrained_strict: bool = True
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    text_model: str | None = None
    pooling: str = "cls"
    text_encoder: str | None = None
    train_blocks: int | None = None
    train_layers: int | None = None
    hidden: int = 512
    dropout: float = 0.2
    lstm: LSTMParams = field(default_factory=LSTMParams)
    hybrid: HybridParams = field(default_factory=HybridParams)


def parse_params(cfg: Config) -> ModelParams:
    """Typed ``model.params``; unknown keys and wrong types raise :class:`ConfigError`."""
    params = ModelParams()
    merge(params, cfg.model.params, f"model '{cfg.model.name or cfg.model.kind}'", "model.params.")
    return params


def require(value: Any, key: str, kind: str) -> Any:
    """``value``, or a clear error naming the missing ``model.params`` key."""
    if value is None:
        raise ConfigError(f"model kind '{kind}' needs model.params.{key}")
    return value


def project_path(path: str | Path) -> Path:
    """A path from a config, resolved against the project root unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else paths.root() / path


class MLPHead(nn.Sequential):
    """Dropout -> Linear -> GELU -> Dropout -> Linear, or Dropout -> Linear when ``hidden=0``.

    The GELU hidden layer lets a late fusion mix modalities; the plain linear head is the
    classic fine-tuning head for a single encoder.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, dropout: float = 0.2):
        if hidden > 0:
            layers = [nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU()]
            layers += [nn.Dropout(dropout), nn.Linear(hidden, n_classes)]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(in_dim, n_classes)]
        super().__init__(*layers)


class MultiLabelModel(nn.Module):
    """Base of every torch model: ``forward(batch) -> logits (B, L)``.

    Subclasses add their encoders with :meth:`add_encoder` and fetch them with
    :meth:`encoder`. Pretrained-capable encoders land in :attr:`backbone`, from-scratch ones
    (``is_backbone = False``, the BiLSTM) in :attr:`scratch`, so a state-dict key starting with
    ``backbone.`` is exactly a backbone tensor. Parameter groups, freezing and counts follow.

    Attributes:
        classes: Label tokens, in logit column order.
        needs_image: The batch must hold ``image`` (B, 3, H, W), normalised.
        needs_text: The batch must hold ``input_ids`` and ``attention_mask`` (B, T), right-padded.
        default_text_encoder: Tokenizer/encoder family (``hf``/``lstm``) when
            ``model.params.text_encoder`` is unset; :func:`mmfold.models.build_tokenizer` reads it.
        image_data_config: timm preprocessing (``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``...) with ``train.image_size`` applied; None without
            an image side.
        backbone: Pretrained-capable encoders by modality (``image``, ``text``).
        scratch: Encoders learned from scratch, by modality.
    """

    needs_image: bool = False
    needs_text: bool = False
    default_text_encoder: str | None = None

    def __init__(self, classes: list[str]) -> None:
        super().__init__()
        self.classes = list(classes)
        self.image_data_config: dict[str, Any] | None = None
        self.backbone = nn.ModuleDict()
        self.scratch = nn.ModuleDict()
        self._backbone_trainable = True

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        """Logits ``(B, len(classes))``."""
        raise NotImplementedError

    def add_encoder(self, name: str, module: nn.Module) -> nn.Module:
        """Register a modality encoder in :attr:`backbone` or :attr:`scratch`; returns it."""
        target = self.backbone if getattr(module, "is_backbone", True) else self.scratch
        target[name] = module
        return module

    def encoder(self, name: str) -> nn.Module:
        """The encoder registered as ``name``."""
        return self.backbone[name] if name in self.backbone else self.scratch[name]

    def pretrained_notes(self) -> list[PretrainedNote]:
        """What each pretrained-capable encoder loaded (``pretrained_note`` set when built)."""
        return [n for enc in self.backbone.values() if (n := getattr(enc, "pretrained_note", None))]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the pretrained-capable encoders (lower LR, freezable)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in :meth:`backbone_parameters` (full LR)."""
        ids = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in ids)

    def set_backbone_trainable(self, flag: bool) -> None:
        """Freeze or unfreeze the backbone.

        A frozen backbone also stays in eval mode (see :meth:`train`), so BatchNorm statistics
        and dropout do not drift while only the head learns.
        """
        self._backbone_trainable = flag
        for p in self.backbone.parameters():
            p.requires_grad_(flag)
        for prefix in self.frozen_prefixes().values():
            prefix.requires_grad_(False)  # frozen for good: its outputs are cached
        self.train(self.training)

    def frozen_prefixes(self) -> dict[str, nn.Module]:
        """Encoders' frozen lower parts whose outputs the engine caches, by batch key.

        ``{"image_feats": ...}`` when the image side trains only its top stages
        (``model.params.train_blocks``), ``{"text_states": ...}`` when the text side trains
        only its top layers (``train_layers``). Each module maps the usual input (a normalised
        image batch, or ``(input_ids, attention_mask)``) to what the trainable rest reads from
        that batch key instead; see :mod:`mmfold.train.prefix_cache`.
        """
        out = {}
        for name, key in (("image", "image_feats"), ("text", "text_states")):
            prefix = getattr(self.backbone[name], "prefix", None) if name in self.backbone else None
            if prefix is not None:
                out[key] = prefix
        return out

    def train(self, mode: bool = True) -> MultiLabelModel:
        """Like ``nn.Module.train``, but a frozen backbone is kept in eval mode."""
        super().train(mode)
        if not self._backbone_trainable:
            self.backbone.eval()
        return self

    def param_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, for logs and ``done.json``."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, total
