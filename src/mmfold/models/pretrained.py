"""Load local pretrained weights into a model whose key names may differ from the file's.

Weight files found in the wild are wrapped (``{"state_dict": ...}``), prefixed (``module.``
from DataParallel, ``model.`` from Lightning), carry a classifier for another label set, or
come from another implementation of the same architecture with other module names (the
efficientnet-lite0 package uses ``_blocks.0._bn1`` where timm says ``blocks.0.0.bn1``). The
last case is recoverable when both list the same tensors in the same order: we map by order and
insist that every pair agrees on shape *and* leaf name (``weight``, ``running_var``...), which
catches an off-by-one that shapes alone would miss (BatchNorm vectors all look alike). Only
pickled ``.pth`` files keep module order; ``.safetensors`` sorts its keys, so such files must
carry the model's own names (``mmfold weights`` writes them that way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmfold.errors import UserError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "state_dict_ema")
PREFIXES = ("module.", "model.", "backbone.", "encoder.")
CLASSIFIER_NAMES = ("classifier", "fc", "_fc", "head", "head.fc", "last_linear", "logits")


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did, for logs and tests.

    Attributes:
        path: The file read.
        loaded: Number of tensors copied into the model.
        missing: Model keys the file did not provide (left at random init).
        unexpected: File keys the model has no place for (ignored).
        dropped: Classifier keys removed because the model has its own head.
        by_order: True when names differed and tensors were matched by position.
    """

    path: Path
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    by_order: bool = False

    def summary(self) -> str:
        """One line for the log."""
        how = " (matched by order)" if self.by_order else ""
        return (f"{self.path.name}: loaded {self.loaded} tensors{how}, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.dropped)} classifier dropped")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors from a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file, unwrapped.

    ``torch.load`` runs with ``weights_only=True``: a weight file must never execute code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained file {path} not found (did you run `make weights`?)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"cannot read weights from {path}: {e}") from e
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> StateDict:
    """Find the tensor dict inside a checkpoint (``{"state_dict": {...}}`` and friends)."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _unwrap(obj[key], path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise UserError(f"{path} holds no state dict of tensors (top-level: {type(obj).__name__})")


def strip_prefixes(sd: StateDict, target_keys: set[str]) -> StateDict:
    """Remove wrapper prefixes that every key shares but the model's own keys do not."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd) and not _all_start(target_keys, prefix):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _all_start(keys: set[str], prefix: str) -> bool:
    """True when every key has ``prefix`` (then it is part of the model's own names)."""
    return bool(keys) and all(k.startswith(prefix) for k in keys)


def drop_classifier(sd: StateDict, target_keys: set[str],
                    names: tuple[str, ...]) -> tuple[StateDict, list[str]]:
    """Remove classifier tensors the model has no place for (its own head replaces them)."""
    def is_head(k: str) -> bool:
        return k not in target_keys and any(k.startswith(n + ".") for n in names)

    dropped = [k for k in sd if is_head(k)]
    return {k: v for k, v in sd.items() if k not in dropped}, dropped


def _leaf(key: str) -> str:
    """Last name component: ``weight``, ``bias``, ``running_mean``..."""
    return key.rsplit(".", 1)[-1]


def map_by_order(sd: StateDict, target: StateDict) -> tuple[StateDict, list[str]] | None:
    """Rename ``sd`` onto ``target``'s keys by position, or None if they do not line up.

    Trailing source tensors beyond the target's count (usually a classifier) are returned as
    unused. Every matched pair must agree on shape and leaf name.
    """
    src = list(sd.items())
    dst = [(k, v) for k, v in target.items() if _has_counters(sd) or not _optional(k)]
    if len(src) < len(dst):
        return None
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape or _leaf(sk) != _leaf(dk):
            return None
    renamed = {dk: sv for (_, sv), (dk, _) in zip(src, dst)}
    return renamed, [k for k, _ in src[len(dst):]]


def _optional(key: str) -> bool:
    """BatchNorm step counters: absent from older checkpoints and unused in training."""
    return key.endswith("num_batches_tracked")


def _has_counters(sd: StateDict) -> bool:
    """Whether the file stores BatchNorm step counters at all."""
    return any(_optional(k) for k in sd)


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Classifier module names: timm's ``pretrained_cfg['classifier']`` plus common ones."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return names + CLASSIFIER_NAMES


def load_pretrained(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadResult:
    """Copy weights from a local file into ``model``, renaming keys when needed.

    Args:
        model: Usually a timm model built with ``num_classes=0``.
        path: ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``.
        strict: Raise when any model tensor stays at random init.

    Returns:
        A :class:`LoadResult` (also logged).

    Raises:
        UserError: unreadable file, shape mismatches, or missing keys under ``strict``.
    """
    path = Path(path)
    return load_state(model, read_state_dict(path), path, strict=strict, ordered=_ordered(path))


def load_state(model: nn.Module, sd: StateDict, source: Path, *, strict: bool = True,
               ordered: bool = True) -> LoadResult:
    """:func:`load_pretrained` for tensors already in memory (``source`` names them in messages).

    Args:
        ordered: Whether ``sd`` keeps the source model's module order, so the by-order
            mapping may be tried when names differ.
    """
    target = model.state_dict()
    tkeys = set(target)
    names = _classifier_names(model)
    sd = strip_prefixes(sd, tkeys)
    result = LoadResult(source)
    if not {k for k in tkeys if not _optional(k)} <= set(sd) and ordered:
        sd = _rename_by_order(sd, target, names, result)
    sd, result.dropped = drop_classifier(sd, tkeys, names)
    _check_shapes(sd, target, source)
    result.missing = sorted(k for k in tkeys - set(sd) if not _optional(k))
    result.unexpected = sorted(set(sd) - tkeys)
    model.load_state_dict({k: v for k, v in sd.items() if k in tkeys}, strict=False)
    result.loaded = len(tkeys & set(sd))
    _report(result, strict=strict)
    return result


def _ordered(path: str | Path) -> bool:
    """Pickled state dicts keep module order; safetensors sorts keys, so order means nothing."""
    return Path(path).suffix != ".safetensors"


def _rename_by_order(sd: StateDict, target: StateDict, names: tuple[str, ...],
                     result: LoadResult) -> StateDict:
    """Try the by-order mapping (with, then without the file's classifier).

    Returns the renamed tensors plus any trailing ones under their own names (so a classifier
    is still recognised and dropped), or ``sd`` unchanged when nothing lines up.
    """
    headless = drop_classifier(sd, set(target), names)[0]
    mapped = map_by_order(sd, target) or map_by_order(headless, target)
    if mapped is None:
        return sd
    result.by_order = True
    renamed, rest = mapped
    return {**renamed, **{k: sd[k] for k in rest}}


def _check_shapes(sd: StateDict, target: StateDict, path: str | Path) -> None:
    """Refuse tensors whose shapes differ: loading them would crash or mean a wrong model."""
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise UserError(f"{path}: {len(bad)} tensors have other shapes than the model, e.g. "
                        + "; ".join(bad[:5]))


def _report(result: LoadResult, *, strict: bool) -> None:
    """Log the outcome; under ``strict`` any missing tensor is an error naming a few."""
    log.info(result.summary())
    if result.unexpected:
        log.warning("%s: ignored %d unexpected keys, e.g. %s", result.path.name,
                    len(result.unexpected), result.unexpected[:5])
    if result.missing and strict:
        raise UserError(
            f"{result.path}: {len(result.missing)} of the model's tensors are not in the file, "
            f"e.g. {result.missing[:5]}; wrong backbone for this file? "
            "(set model.params.pretrained_strict=false to load it anyway)")
    if result.missing:
        log.warning("%s: %d tensors left at random init, e.g. %s", result.path.name,
                    len(result.missing), result.missing[:5])
