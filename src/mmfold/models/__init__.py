"""Torch model kinds for the engine: ``build_model(cfg, classes)`` and ``build_tokenizer``.

Built-in kinds (``model.kind`` in ``configs/models/<name>.yaml``):

========== ================================================================================
image      any timm backbone (``params.backbone``) + multi-label head
text       a local Hugging Face encoder (``params.text_model``), ``cls``/``mean`` pooled + head
lstm_text  embedding + BiLSTM on a word vocabulary fitted on the fold's training captions
fusion     image + text embeddings, concatenated into an MLP head (late fusion)
hybrid     image feature tokens + caption tokens through a small Transformer encoder
========== ================================================================================

``fusion`` and ``hybrid`` take ``params.text_encoder: hf | lstm``. Options are documented on
:class:`mmfold.models.base.ModelParams`.

Adding a model is either a YAML file naming a kind, or a registered class::

    from mmfold.models import MODELS, MultiLabelModel

    @MODELS.register("my_kind")
    class MyModel(MultiLabelModel):
        needs_image = True
        def __init__(self, cfg, classes): ...
        def forward(self, batch): ...

(the module must be imported before ``build_model`` runs, e.g. from this file).
"""

from __future__ import annotations

from collections.abc import Sequence

from mmfold import hub
from mmfold.config import Config
from mmfold.models import fusion, image, text  # noqa: F401  (registers the kinds)
from mmfold.models.base import MODELS, ModelParams, MultiLabelModel, parse_params, pretrained_loading
from mmfold.models.pretrained import LoadResult, load_pretrained, load_state
from mmfold.models.tokenizers import TOKENIZERS, HFTokenizer, Tokenizer, WordTokenizer, text_need

__all__ = [
    "MODELS", "TOKENIZERS", "HFTokenizer", "LoadResult", "ModelParams", "MultiLabelModel",
    "Tokenizer", "WordTokenizer", "build_model", "build_tokenizer", "load_pretrained", "load_state",
    "text_encoder_of", "weight_needs",
]


def build_model(cfg: Config, classes: list[str], pretrained: bool = True) -> MultiLabelModel:
    """A fresh model of kind ``cfg.model.kind`` with one logit per class (a new one per fold).

    Args:
        pretrained: Load the encoders' pretrained weights. ``False`` when a checkpoint is about
            to overwrite every weight (predicting): nothing is read from the hub then.
    """
    with pretrained_loading(pretrained):
        return MODELS.get(cfg.model.kind)(cfg, classes)


def weight_needs(cfg: Config) -> list[hub.Need]:
    """Every pretrained weight a torch kind loads when it trains: the image backbone's (unless
    ``pretrained: false``) and the Hugging Face text model's (with its tokenizer).

    Found without building anything, so a missing one stops a run before any fold moves.
    """
    builder = MODELS.get(cfg.model.kind)
    p = parse_params(cfg)
    needs = []
    if getattr(builder, "needs_image", False) and p.backbone:
        needs.append(image.image_need(p))
    if text_encoder_of(cfg) == "hf" and p.text_model:
        needs.append(text_need(p))
    return [n for n in needs if n is not None]


def text_encoder_of(cfg: Config) -> str | None:
    """``hf``/``lstm`` for kinds that read captions, None for image-only kinds."""
    builder = MODELS.get(cfg.model.kind)
    if not getattr(builder, "needs_text", False):
        return None
    return parse_params(cfg).text_encoder or getattr(builder, "default_text_encoder", None) or "hf"


def build_tokenizer(cfg: Config, train_captions: Sequence[str]) -> Tokenizer | None:
    """The tokenizer matching the model's text side, or None for image-only kinds.

    Args:
        cfg: Resolved config (``model.kind``, ``model.params``).
        train_captions: Captions of the fold's *training* rows. Only the word vocabulary of
            ``lstm`` encoders is fitted on them; HF tokenizers ignore them.
    """
    side = text_encoder_of(cfg)
    return None if side is None else TOKENIZERS.get(side)(parse_params(cfg), train_captions)
