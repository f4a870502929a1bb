"""Tiny stand-ins for real pretrained models, shared by tests, the engine's tests and the demo.

They need no network and no weight packages: a randomly initialised 2-layer BERT with a
WordPiece tokenizer trained on a handful of captions, and per-kind ``model.params`` that use
timm's ``test_*`` backbones. Everything builds in well under a second on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CAPTIONS = (
    "a dog runs on the grass", "two cats sleep on a red sofa", "a man rides a bike in the city",
    "a plate of food with a fork", "a red car parked near a tree", "people walk on the beach",
    "a bird sits on a wooden fence", "a train at the station at night",
)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tiny_tokenizer(captions: Sequence[str] = CAPTIONS, vocab_size: int = 200):
    """A ``BertTokenizerFast`` whose WordPiece vocabulary is trained on ``captions``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                       show_progress=False)
    tok.train_from_iterator(list(captions), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_tiny_bert(folder: str | Path, captions: Sequence[str] = CAPTIONS, seed: int = 0) -> Path:
    """Save a random 2-layer BERT (hidden 32, 2 heads) and its tokenizer into ``folder``.

    The folder loads with ``AutoModel``/``AutoTokenizer.from_pretrained(folder)`` like a real
    checkpoint, so it can stand in for ``weights/minilm`` as ``model.params.text_model``.
    """
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer(captions)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_mpnet(folder: str | Path, captions: Sequence[str] = CAPTIONS, seed: int = 0) -> Path:
    """Save a random 3-layer MPNet (hidden 32, 2 heads; all-mpnet-base-v2's architecture, with
    its relative position bias) and a tokenizer into ``folder``."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    folder = Path(folder)
    tokenizer = make_tiny_tokenizer(captions)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=130, pad_token_id=0)
    torch.manual_seed(seed)
    MPNetModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_params(kind: str, bert_dir: str | Path | None = None,
                backbone: str = "test_resnet") -> dict[str, Any]:
    """``model.params`` for a tiny, fast model of each built-in kind.

    Args:
        kind: ``image``, ``text``, ``lstm_text``, ``fusion``, ``hybrid`` or ``cnn_lstm``
            (``hybrid`` with the BiLSTM text side; its ``model.kind`` is ``hybrid``).
        bert_dir: A folder from :func:`make_tiny_bert`, for kinds with an HF text side.
        backbone: A timm ``test_*`` model.
    """
    image = {"backbone": backbone, "pretrained": False, "hidden": 16, "dropout": 0.0}
    hf = {"text_model": str(bert_dir), "pooling": "mean", "hidden": 16, "dropout": 0.0}
    lstm = {"text_encoder": "lstm", "lstm": {"embed_dim": 16, "hidden": 8, "vocab_size": 100},
            "hidden": 16, "dropout": 0.0}
    hybrid = {"hybrid": {"dim": 16, "layers": 1, "heads": 2, "grid": 2, "dropout": 0.0}}
    table = {
        "image": image,
        "text": hf,
        "lstm_text": {k: v for k, v in lstm.items() if k != "text_encoder"},
        "fusion": {**image, **hf},
        "hybrid": {**image, **hf, **hybrid},
        "cnn_lstm": {**image, **lstm, **hybrid},
    }
    return table[kind]
