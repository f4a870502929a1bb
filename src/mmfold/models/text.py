"""Text side: a Hugging Face encoder or an embedding + BiLSTM, and the ``text``/``lstm_text`` kinds.

Every text encoder offers ``tokens(ids, mask) -> (B, T, token_dim)`` for the cross-modal
Transformer and ``forward(ids, mask) -> (B, out_dim)`` pooled for heads and late fusion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmfold.config import Config, ConfigError
from mmfold import hub
from mmfold.models.base import (MODELS, LSTMParams, MLPHead, ModelParams, MultiLabelModel, PretrainedNote,
                                loads_pretrained, parse_params)
from mmfold.models.tokenizers import hf_folder, text_weights
from mmfold.registry import Registry

TEXT_ENCODERS = Registry("text encoder")
POOLINGS = Registry("pooling")
# Where a Hugging Face model class keeps its layer stack, by class name (model.params.train_layers).
LAYER_STACKS = Registry("layer stack (model.params.train_layers)")


@dataclass(frozen=True)
class LayerStack:
    """A Hugging Face encoder's Transformer layers and what each layer call needs besides the
    states and the mask.

    Attributes:
        layers: The layer stack, bottom first.
        shared: Modules every layer reads (MPNet's relative position bias): they belong to the
            frozen prefix, since the cached lower states were computed with them.
        extra: ``states -> keyword arguments`` of each layer call (MPNet's ``position_bias``).
    """

    layers: nn.ModuleList
    shared: tuple[nn.Module, ...] = ()
    extra: Callable[[torch.Tensor], dict[str, torch.Tensor]] = field(default=lambda states: {})


@LAYER_STACKS.register("BertModel")
@LAYER_STACKS.register("RobertaModel")
@LAYER_STACKS.register("XLMRobertaModel")
@LAYER_STACKS.register("ElectraModel")
def bert_layers(model: nn.Module) -> LayerStack:
    """BERT-style encoders (MiniLM is a ``BertModel``): ``embeddings`` then ``encoder.layer``."""
    return LayerStack(model.encoder.layer)


@LAYER_STACKS.register("MPNetModel")
def mpnet_layers(model: nn.Module) -> LayerStack:
    """MPNet (all-mpnet-base-v2): BERT's layout, plus one relative position bias computed from
    the states' length and handed to every layer, as ``MPNetEncoder.forward`` does."""
    encoder = model.encoder
    return LayerStack(encoder.layer, (encoder.relative_attention_bias,),
                      lambda states: {"position_bias": encoder.compute_position_bias(states)})


def attention_mask_for(model: nn.Module, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask the model's own layers expect, built as the model builds it.

    transformers 4 models offer ``get_extended_attention_mask`` (an additive ``(B, 1, 1, T)``
    mask); transformers 5 dropped it for ``masking_utils.create_bidirectional_mask``, which
    also knows the attention implementation (and may return None: no padding to mask).
    """
    if hasattr(model, "get_extended_attention_mask"):
        return model.get_extended_attention_mask(mask, mask.shape)
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=model.config, inputs_embeds=states, attention_mask=mask)


def run_layers(model: nn.Module, stack: LayerStack, layers: list[nn.Module], states: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Token states after ``layers`` (a slice of ``stack``), padding masked out of attention as
    the model itself does.

    A layer returns a tuple in transformers 4 and the states tensor in transformers 5."""
    ext, extra = attention_mask_for(model, states, mask), stack.extra(states)
    for layer in layers:
        out = layer(states, attention_mask=ext, **extra)
        states = out[0] if isinstance(out, tuple) else out
    return states


class TextPrefix(nn.Module):
    """Embeddings + the lower ``cut`` layers of a BERT-style encoder: ``(ids, mask) -> (B, T, H)``.

    Equal to ``model(ids, mask, output_hidden_states=True).hidden_states[cut]``, without
    running the layers above. Holds the stack's shared modules too, so they freeze with it.
    """

    def __init__(self, model: nn.Module, stack: LayerStack, cut: int) -> None:
        super().__init__()
        self.embeddings, self.layers = model.embeddings, nn.ModuleList(stack.layers[:cut])
        self.shared = nn.ModuleList(stack.shared)
        self._model, self._stack = [model], stack  # for the mask helper; a list keeps it out of the tree

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return run_layers(self._model[0], self._stack, list(self.layers), self.embeddings(input_ids=ids), mask)


def split_text_model(model: nn.Module, n_train: int) -> tuple[TextPrefix, LayerStack, list[nn.Module]]:
    """``(frozen prefix, the layer stack, trainable top layers)`` of a Hugging Face encoder.

    Raises:
        ConfigError: ``n_train`` out of range, or a model class no layer stack is registered for.
    """
    name = type(model).__name__
    if name not in LAYER_STACKS:
        raise ConfigError(f"model.params.train_layers is not supported for {name} "
                          f"(supported: {sorted(LAYER_STACKS)}); leave it unset to fine-tune every layer")
    stack = LAYER_STACKS.get(name)(model)
    if not 0 <= n_train <= len(stack.layers):
        raise ConfigError(f"model.params.train_layers must be in 0..{len(stack.layers)} for this encoder, "
                          f"got {n_train}")
    cut = len(stack.layers) - n_train
    return TextPrefix(model, stack, cut), stack, list(stack.layers[cut:])


@POOLINGS.register("cls")
def cls_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first token's state: what BERT-style encoders are pre-trained to summarise into."""
    return tokens[:, 0]


@POOLINGS.register("mean")
def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over real tokens: how sentence-transformers (MiniLM) embed a sentence."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


def _not_unused_weights(record: logging.LogRecord) -> bool:
    """Log filter dropping transformers' "weights ... were not used" notice."""
    return "were not used when initializing" not in record.getMessage()


def hf_architecture(folder: Path) -> nn.Module:
    """The model class a folder's ``config.json`` names, at random init: its weights are about
    to be overwritten by a fold's checkpoint, so reading them would be wasted (and a bundle
    need not carry them)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


def load_hf_model(folder: Path) -> tuple[nn.Module, list[str]]:
    """``AutoModel`` from a local folder, without BERT's pooler where the class allows it, and
    the names of the tensors the folder's weights did not provide (left at init).

    The pooler (a dense layer on ``[CLS]``) is unused by our pooling; leaving it in would
    count parameters that never get a gradient. transformers' notice that the checkpoint's
    pooler weights went unused is expected, so it is filtered out for this one call.
    """
    from transformers import AutoModel

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_not_unused_weights)
    kw = {"local_files_only": True, "output_loading_info": True}
    try:
        try:
            model, info = AutoModel.from_pretrained(str(folder), add_pooling_layer=False, **kw)
        except TypeError:  # encoders without a pooler do not take the argument
            model, info = AutoModel.from_pretrained(str(folder), **kw)
    finally:
        logger.removeFilter(_not_unused_weights)
    return model, sorted(info.get("missing_keys") or [])


class HFTextEncoder(nn.Module):
    """``AutoModel`` from a local folder, pooled by ``cls`` or masked ``mean``.

    With ``train_layers`` only the top layers train: :attr:`prefix` (embeddings and the lower
    layers, frozen) is what the engine caches per dataset under the batch key ``text_states``,
    and :meth:`tokens_of` runs the top layers on that cache.

    Attributes:
        model: The transformers model.
        out_dim / token_dim: ``config.hidden_size``.
        prefix: The frozen lower part, or None when every layer trains.
    """

    is_backbone = True

    def __init__(self, weights: hub.Resolved, pooling: str = "cls", train_layers: int | None = None,
                 what: str = "text model") -> None:
        super().__init__()
        folder = hf_folder(weights.path)
        if loads_pretrained():
            self.model, missing = load_hf_model(folder)
            n = len(self.model.state_dict()) - len(missing)
            self.pretrained_note = PretrainedNote(what, weights.record(), weights.describe(), n, len(missing),
                                                  missing[:5])
        else:
            self.model = hf_architecture(folder)
            self.pretrained_note = PretrainedNote(what, source="weights from the checkpoint")
        self.pool_fn: Callable[..., torch.Tensor] = POOLINGS.get(pooling)
        self.token_dim = self.out_dim = int(self.model.config.hidden_size)
        prefix, stack, top = (split_text_model(self.model, train_layers) if train_layers is not None
                              else (None, None, []))
        object.__setattr__(self, "prefix", prefix)  # views of self.model's modules, not submodules
        object.__setattr__(self, "_stack", stack)
        object.__setattr__(self, "_top", top)

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, T, hidden)``."""
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled sentence embedding ``(B, hidden)``."""
        return self.pool_fn(self.tokens(ids, mask), mask)

    def tokens_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`tokens` of a batch: the top layers on cached ``text_states`` when it holds them."""
        ids, mask = text_inputs(batch)
        if "text_states" in batch:
            return run_layers(self.model, self._stack, self._top, batch["text_states"], mask)
        return self.tokens(ids, mask)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embedding of a batch."""
        return self.pool_fn(self.tokens_of(batch), batch["attention_mask"])


class LSTMTextEncoder(nn.Module):
    """Word embedding + bidirectional LSTM, pooled by masked mean and max over time.

    Learned from scratch, so it is not a backbone (full LR, never frozen). Sequences are
    packed, so the backward direction starts at each caption's last word, not at padding.

    Attributes:
        token_dim: ``2 * hidden`` (both directions).
        out_dim: ``4 * hidden`` (mean and max of the token states).
    """

    is_backbone = False

    def __init__(self, p: LSTMParams) -> None:
        super().__init__()
        self.embed = nn.Embedding(p.vocab_size, p.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(p.dropout)
        self.lstm = nn.LSTM(p.embed_dim, p.hidden, num_layers=p.layers, batch_first=True,
                            bidirectional=True, dropout=p.dropout if p.layers > 1 else 0.0)
        self.token_dim, self.out_dim = 2 * p.hidden, 4 * p.hidden

    # a packed step runs on the captions still longer than it: evaluation batches must hold
    # captions of one length for a row's output not to depend on the others (mmfold.canonical)
    packs_sequences = True

    def tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-word states ``(B, T, 2*hidden)``; zeros after each caption's end."""
        lengths = mask.sum(1).clamp(min=1).cpu()  # an empty caption still yields one step
        packed = pack_padded_sequence(self.drop(self.embed(ids)), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])[0]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean and max over the caption's words, concatenated ``(B, 4*hidden)``."""
        out = self.tokens(ids, mask)
        n = mask.sum(1).clamp(min=1)
        valid = torch.arange(ids.shape[1], device=ids.device)[None] < n[:, None]
        mean = (out * valid.unsqueeze(-1)).sum(1) / n.unsqueeze(-1).to(out.dtype)
        peak = out.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(1)
        return torch.cat([mean, peak], dim=1)

    def tokens_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`tokens` of a batch (nothing to cache: every part learns)."""
        return self.tokens(*text_inputs(batch))

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embedding of a batch."""
        return self(*text_inputs(batch))


@TEXT_ENCODERS.register("hf")
def build_hf_encoder(p: ModelParams, kind: str) -> HFTextEncoder:
    """``params.text_model`` pooled by ``params.pooling``."""
    return HFTextEncoder(text_weights(p), p.pooling, p.train_layers, f"text model {p.text_model}")


@TEXT_ENCODERS.register("lstm")
def build_lstm_encoder(p: ModelParams, kind: str) -> LSTMTextEncoder:
    """A BiLSTM sized by ``params.lstm``."""
    if p.train_layers is not None:
        raise ConfigError("model.params.train_layers applies to Hugging Face encoders, not the BiLSTM "
                          "(it learns from scratch: every part trains)")
    return LSTMTextEncoder(p.lstm)


def text_side(p: ModelParams, default: str | None) -> str:
    """``params.text_encoder`` or the kind's default (``hf``/``lstm``)."""
    return p.text_encoder or default or "hf"


def build_text_encoder(p: ModelParams, default: str | None, kind: str) -> nn.Module:
    """The text encoder a kind asks for."""
    return TEXT_ENCODERS.get(text_side(p, default))(p, kind)


def text_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` from a batch."""
    return batch["input_ids"], batch["attention_mask"]


@MODELS.register("text")
class TextModel(MultiLabelModel):
    """A text encoder + :class:`MLPHead`; by default a Hugging Face encoder.

    Params: ``text_model``, ``pooling`` (``cls``/``mean``), ``text_encoder`` (``hf``),
    ``hidden``, ``dropout``; with ``text_encoder: lstm`` the ``lstm`` block instead.
    """

    needs_text = True
    default_text_encoder = "hf"

    def __init__(self, cfg: Config, classes: list[str]) -> None:
        super().__init__(classes)
        p = parse_params(cfg)
        self.add_encoder("text", build_text_encoder(p, self.default_text_encoder, cfg.model.kind))
        self.head = MLPHead(self.encoder("text").out_dim, len(classes), p.hidden, p.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from the pooled caption embedding."""
        return self.head(self.encoder("text").encode(batch))


@MODELS.register("lstm_text")
class LSTMTextModel(TextModel):
    """Embedding + BiLSTM caption encoder + head, on a word vocabulary fitted per fold.

    Params: ``lstm`` {``embed_dim``, ``hidden``, ``layers``, ``vocab_size``, ``min_freq``,
    ``dropout``}, ``hidden``, ``dropout``.
    """

    default_text_encoder = "lstm"
