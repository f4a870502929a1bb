"""Image side: any timm backbone by name, and the ``image`` kind (backbone + multi-label head)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from mmfold import hub
from mmfold.config import Config, ConfigError
from mmfold.models.base import (MODELS, MLPHead, ModelParams, MultiLabelModel, PretrainedNote, loads_pretrained,
                                parse_params, project_path, require)
from mmfold.models.pretrained import load_pretrained
from mmfold.registry import Registry

# How to cut a timm backbone class into a frozen prefix and a trainable rest, by class name.
BACKBONE_SPLITS = Registry("backbone split (model.params.train_blocks)")


class Stages(nn.Module):
    """A run of a backbone's own modules, applied in order (they stay owned by the backbone)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x


@BACKBONE_SPLITS.register("EfficientNet")
def split_efficientnet(model: nn.Module, n_train: int) -> tuple[nn.Module, nn.Module]:
    """timm's EfficientNet family (EfficientNet, -Lite, MobileNetV2, MixNet, MNASNet...):
    ``conv_stem, bn1, blocks[:-n]`` frozen; ``blocks[-n:], conv_head, bn2`` train."""
    cut = len(model.blocks) - n_train
    return (Stages(model.conv_stem, model.bn1, *model.blocks[:cut]),
            Stages(*model.blocks[cut:], model.conv_head, model.bn2))


def split_backbone(model: nn.Module, n_train: int) -> tuple[nn.Module, nn.Module]:
    """``(frozen prefix, trainable rest)`` of a timm model, sharing its modules.

    Raises:
        ConfigError: ``n_train`` out of range, or a backbone class no split is registered for.
    """
    name = type(model).__name__
    if name not in BACKBONE_SPLITS:
        raise ConfigError(f"model.params.train_blocks is not supported for timm {name} backbones "
                          f"(supported: {sorted(BACKBONE_SPLITS)}); leave it unset to fine-tune all of it")
    n_stages = len(model.blocks)
    if not 0 <= n_train <= n_stages:
        raise ConfigError(f"model.params.train_blocks must be in 0..{n_stages} for this backbone, got {n_train}")
    return BACKBONE_SPLITS.get(name)(model, n_train)


WEIGHTS_FIX = "make weights DATA=<data> MODEL=<model>"


def close_timm_names(name: str, n: int = 8) -> list[str]:
    """timm's architectures nearest to a misspelt one (``resnet_18`` -> ``resnet18``...), by
    spelling with ``_``/``-`` ignored, since timm writes ``resnet18`` but ``vit_base_patch16_224``."""
    import difflib

    arch = name.split(".")[0].lower()
    names = timm.list_models()
    folded = {}
    for m in names:
        folded.setdefault(m.replace("_", "").replace("-", ""), m)
    key = arch.replace("_", "").replace("-", "")
    exact = [folded[key]] if key in folded else []
    near = difflib.get_close_matches(arch, names, n=n, cutoff=0.6)
    near_folded = [folded[k] for k in difflib.get_close_matches(key, list(folded), n=n, cutoff=0.6)]
    return list(dict.fromkeys(exact + near_folded + near))[:n]


def check_timm_name(name: str) -> None:
    """Refuse a name timm does not know, suggesting the ones it does."""
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model '{name}'; closest: {close_timm_names(name)}")


def timm_source(name: str) -> tuple[str | None, str]:
    """timm's own split of a model name: ``("hf-hub", "org/name@rev")`` for a model that is a hub
    repo (its ``config.json`` names the architecture), ``("local-dir", folder)`` for such a
    folder on disk, ``(None, name)`` for a registry name (``convnext_tiny.fb_in22k``)."""
    from timm.models import parse_model_name

    try:
        return parse_model_name(name)
    except ValueError as e:
        raise ConfigError(f"model.params.backbone: {e}") from e


def create_timm(name: str, image_size: int | None, kwargs: dict[str, Any], load: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``, never downloading.

    ``load`` holds timm's own pretrained arguments for weights already on disk
    (``pretrained=True``, and for a file ``pretrained_cfg_overlay=dict(file=...)``: timm's key
    filters and classifier handling, strict). ``name`` may be a registry name or a
    ``local-dir:`` folder (a hub snapshot). Models with a fixed input size (ViTs) are built
    for ``image_size`` when it is set; CNNs take any size and refuse the ``img_size``
    argument, so it is only passed to those that accept it.
    """
    if timm_source(name)[0] is None:
        check_timm_name(name)
    base = {**kwargs, "pretrained": False, "num_classes": 0, **(load or {})}
    if image_size:
        try:
            return timm.create_model(name, img_size=image_size, **base)
        except TypeError:
            pass
    try:
        return timm.create_model(name, **base)
    except TypeError as e:
        raise ConfigError(f"timm '{name}' rejects model.params.timm_kwargs {kwargs}: {e}") from e


def _safe_alternatives(filename: str) -> tuple[str, ...]:
    """The files timm tries for a hub weight name, in its order: the safetensors twin first
    (``pytorch_model.bin`` -> ``model.safetensors``), then the name itself."""
    if filename == "pytorch_model.bin":
        return ("model.safetensors", filename)
    if filename == "open_clip_pytorch_model.bin":
        return ("open_clip_model.safetensors", filename)
    return (filename[:-4] + ".safetensors", filename) if filename.endswith(".bin") else (filename,)


def timm_need(name: str, revision: str | None = None) -> hub.Need:
    """The hub files behind a timm name with pretrained weights (``resnet18`` ->
    ``timm/resnet18.a1_in1k``, its default tag), as timm itself would download them.

    Raises:
        ConfigError: the name has no pretrained weights on the hub.
    """
    from timm.models import get_pretrained_cfg

    check_timm_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        arch = name.split(".")[0]
        raise ConfigError(f"timm '{name}' has no pretrained weights on the Hugging Face hub (tags with "
                          f"weights: timm.list_pretrained('{arch}*')); set model.params.pretrained: false to "
                          "train it from random init, or model.params.pretrained_file to a weights file")
    repo, _, pinned = cfg.hf_hub_id.partition("@")
    return hub.Need(name, repo_id=repo, files=_safe_alternatives(cfg.hf_hub_filename or "pytorch_model.bin"),
                    revision=revision or pinned or None)


def image_need(p: ModelParams) -> hub.Need | None:
    """What the image backbone loads: ``pretrained_file``, else timm's hub weights, or None
    with ``pretrained: false`` (written out). An ``hf-hub:``/``local-dir:`` backbone always
    needs its folder: its ``config.json`` is the architecture."""
    name = require(p.backbone, "backbone", "image")
    source, ident = timm_source(name)
    if source is not None:
        if p.pretrained_file:
            raise ConfigError(f"model.params.backbone {name} brings its own weights: drop pretrained_file, or "
                              "name the architecture (e.g. convnext_tiny) to load a file into it")
        if source == "local-dir":
            return hub.Need(name, path=project_path(ident))
        repo, _, pinned = ident.partition("@")
        return hub.Need(name, repo_id=repo, revision=p.revision or pinned or None)
    if p.pretrained_file:
        if not p.pretrained:
            raise ConfigError("model.params.pretrained is false but pretrained_file is set: drop one of them")
        return hub.Need(p.pretrained_file, path=project_path(p.pretrained_file))
    return timm_need(name, p.revision) if p.pretrained else None


def pretrained_backbone(p: ModelParams, image_size: int | None) -> tuple[nn.Module, PretrainedNote]:
    """The timm backbone with the weights :func:`image_need` names, and what it loaded.

    A hub file loads through timm's own mechanism; a local ``pretrained_file`` through
    :func:`load_pretrained`, which also maps the key names of another implementation."""
    what = f"image backbone {p.backbone}"
    if timm_source(p.backbone)[0] is not None:
        return sourced_backbone(p, image_size, what)
    need = image_need(p) if loads_pretrained() else None
    if need is None:
        model = create_timm(p.backbone, image_size, p.timm_kwargs)
        note = PretrainedNote(what) if loads_pretrained() else PretrainedNote(what, source="weights from the checkpoint")
        return model, note
    weights = hub.require(need, WEIGHTS_FIX)
    if need.repo_id is None:
        model = create_timm(p.backbone, image_size, p.timm_kwargs)
        result = load_pretrained(model, weights.path, strict=p.pretrained_strict)
        return model, PretrainedNote(what, weights.record(), weights.describe(), result.loaded, len(result.missing),
                                     result.missing[:5])
    load = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights.path)}}
    model = create_timm(p.backbone, image_size, p.timm_kwargs, load)
    return model, PretrainedNote(what, weights.record(), weights.describe(), len(model.state_dict()), 0)


def sourced_backbone(p: ModelParams, image_size: int | None, what: str) -> tuple[nn.Module, PretrainedNote]:
    """An ``hf-hub:``/``local-dir:`` backbone, built by timm from the folder on disk (a hub
    snapshot: never a download), its weights loaded by timm unless ``pretrained: false`` or a
    checkpoint is about to overwrite them."""
    folder = hub.require(image_need(p), WEIGHTS_FIX)
    name = f"local-dir:{folder.path}"
    if p.pretrained and loads_pretrained():
        model = create_timm(name, image_size, p.timm_kwargs, {"pretrained": True})
        return model, PretrainedNote(what, folder.record(), folder.describe(), len(model.state_dict()), 0)
    model = create_timm(name, image_size, p.timm_kwargs)
    return model, PretrainedNote(what) if loads_pretrained() else PretrainedNote(what, source="weights from the checkpoint")


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

    With ``train_blocks`` the backbone is cut in two (:func:`split_backbone`): :attr:`prefix`,
    frozen, whose output the engine caches once per dataset under the batch key
    ``image_feats``, and the trainable rest that :meth:`features_of` runs on that cache. The
    halves are views of :attr:`model`'s own modules (kept out of the module tree, so the state
    dict and checkpoints are the same as without a cut).

    Attributes:
        model: The timm model (``num_classes=0``).
        out_dim: Width of the pooled vector (a few timm models widen it after pooling).
        token_dim: Width of the feature map / tokens.
        data_config: Preprocessing for the dataset (see :func:`data_config`).
        prefix: The frozen lower part, or None when the whole backbone trains.
    """

    is_backbone = True

    def __init__(self, model: nn.Module, image_size: int | None = None,
                 overrides: dict[str, Any] | None = None, train_blocks: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.token_dim: int = model.num_features
        self.out_dim: int = getattr(model, "head_hidden_size", None) or model.num_features
        self.data_config = data_config(model, image_size, overrides)
        self._nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        halves = split_backbone(model, train_blocks) if train_blocks is not None else (None, None)
        # plain attributes, not submodules: the modules already live under self.model
        object.__setattr__(self, "prefix", halves[0])
        object.__setattr__(self, "_rest", halves[1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: ``(B, C, H, W)`` for CNNs, ``(B, N, D)`` for token models."""
        f = self.model.forward_features(x)
        return f.permute(0, 3, 1, 2) if self._nhwc and f.ndim == 4 else f

    def features_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`features` of a batch: from the cached prefix output when it holds one."""
        if "image_feats" in batch:
            return self._rest(batch["image_feats"])
        return self.features(batch["image"])

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embedding ``(B, out_dim)`` of a batch (cached prefix output or pixels)."""
        return self.pool(self.features_of(batch))

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooling (global average, CLS token...) -> ``(B, out_dim)``."""
        if self._nhwc and feats.ndim == 4:
            feats = feats.permute(0, 2, 3, 1)
        return self.model.forward_head(feats, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``(B, out_dim)``."""
        return self.pool(self.features(x))


def build_image_encoder(p: ModelParams, image_size: int | None, kind: str) -> ImageEncoder:
    """The timm backbone named in ``params.backbone``, with its pretrained weights."""
    require(p.backbone, "backbone", kind)
    model, note = pretrained_backbone(p, image_size)
    enc = ImageEncoder(model, image_size, p.data_config, p.train_blocks)
    enc.pretrained_note = note
    return enc


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
        return self.head(self.encoder("image").encode(batch))
