"""Caption tokenizers: a Hugging Face wrapper and a word vocabulary for the BiLSTM encoder.

Both are called as ``tok(texts, max_len) -> {"input_ids", "attention_mask"}`` (numpy int64,
shape ``(N, max_len)``, right-padded) and expose ``key``, a string that changes whenever the
ids would, so token-id caches can be keyed by ``(tok.key, max_len)``.

The word vocabulary is *fitted*: the engine passes the training captions of the fold being
trained, never the validation fold's, so validation words the model never saw map to
``<unk>`` exactly as unseen test words will.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmfold import hub
from mmfold.errors import UserError
from mmfold.models.base import ModelParams, project_path, require
from mmfold.registry import Registry

TOKENIZERS = Registry("text encoder")

PAD, UNK = "<pad>", "<unk>"
WORD_RE = re.compile(r"\w+|[^\w\s]")


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    key: str

    def __call__(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]: ...


def _sha(text: str) -> str:
    """Short content hash."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hf_folder(path: str | Path) -> Path:
    """A local Hugging Face folder, checked, so a typo never turns into a hub lookup."""
    folder = project_path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a local Hugging Face model folder (no config.json); "
                        "run `make weights` or point model.params.text_model at one")
    return folder


def text_need(p: ModelParams) -> hub.Need:
    """What ``params.text_model`` names: a local model folder, else a hub repo id."""
    return hub.folder_need(require(p.text_model, "text_model", "hf text encoder"), p.revision)


def text_weights(p: ModelParams) -> hub.Resolved:
    """The folder (a hub snapshot or a local one) the text model and its tokenizer load from.

    Raises:
        MissingWeights: not on this machine (naming the repo and ``make weights``).
    """
    return hub.require(text_need(p), "make weights DATA=<data> MODEL=<model>")


class HFTokenizer:
    """``AutoTokenizer`` from a local folder, padded to ``max_len`` for fixed-shape caching."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.folder = hf_folder(folder)
        self.tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.key = f"hf-{type(self.tok).__name__}-{_sha(self._fingerprint())}"

    def _fingerprint(self) -> str:
        """Everything that decides the ids: the fast tokenizer's JSON, else the vocabulary."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            return backend.to_str()
        return repr(sorted(self.tok.get_vocab().items()))

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the tokenizer lives in its folder, so only its key, which
        :func:`tokenizer_from_state` checks (a changed folder would encode other ids)."""
        return {"kind": "hf", "key": self.key}

    def __call__(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """Ids and mask ``(N, max_len)``, truncated and right-padded."""
        enc = self.tok(list(texts), max_length=max_len, truncation=True, padding="max_length",
                       return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return WORD_RE.findall(text.lower())


class WordTokenizer:
    """A word vocabulary fitted on training captions: ``<pad>`` = 0, ``<unk>`` = 1.

    Attributes:
        vocab: Words in id order (including the two specials).
        key: ``word-<hash of vocab>``.
    """

    def __init__(self, vocab: list[str]) -> None:
        if vocab[:2] != [PAD, UNK]:
            raise ValueError("a word vocabulary starts with <pad>, <unk>")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.key = f"word-{_sha(chr(10).join(self.vocab))}"

    @classmethod
    def fit(cls, texts: Sequence[str], vocab_size: int = 20000, min_freq: int = 1) -> WordTokenizer:
        """The ``vocab_size - 2`` most frequent words seen at least ``min_freq`` times.

        Ties are broken alphabetically so the vocabulary (and its key) is deterministic.
        """
        counts = Counter(w for t in texts for w in words(t))
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + ranked[: max(vocab_size - 2, 0)])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: int) -> list[int]:
        """Ids of the first ``max_len`` words."""
        return [self.index.get(w, 1) for w in words(text)[:max_len]]

    def __call__(self, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
        """Ids and mask ``(N, max_len)``, right-padded with 0."""
        ids = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            seq = self.encode(text, max_len)
            ids[row, : len(seq)] = seq
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {"kind": "word", "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordTokenizer:
        """Inverse of :meth:`to_dict`."""
        return cls(list(d["vocab"]))


@TOKENIZERS.register("hf")
def hf_tokenizer(p: ModelParams, train_captions: Sequence[str]) -> HFTokenizer:
    """The tokenizer saved beside ``params.text_model``; it needs no fitting."""
    return HFTokenizer(text_weights(p).path)


@TOKENIZERS.register("lstm")
def word_tokenizer(p: ModelParams, train_captions: Sequence[str]) -> WordTokenizer:
    """A word vocabulary fitted on ``train_captions`` only (``params.lstm``)."""
    return WordTokenizer.fit(train_captions, p.lstm.vocab_size, p.lstm.min_freq)


def tokenizer_from_state(p: ModelParams, state: dict[str, Any] | None) -> Tokenizer | None:
    """The tokenizer a fold was trained with, from the state saved in its checkpoint.

    A word vocabulary is rebuilt exactly (it was fitted on that fold's training captions, which
    a bundle or a new test set no longer has); a Hugging Face tokenizer is reloaded from
    ``params.text_model`` and must still encode to the same ids.

    Raises:
        UserError: the Hugging Face folder now holds another tokenizer.
    """
    if state is None:
        return None
    if state["kind"] == "word":
        return WordTokenizer.from_dict(state)
    tok = hf_tokenizer(p, [])
    if tok.key != state["key"]:
        raise UserError(f"{tok.folder}: the tokenizer differs from the one this fold was trained with "
                        f"({tok.key} now, {state['key']} then); restore the folder or retrain")
    return tok
