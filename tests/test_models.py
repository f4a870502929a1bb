"""Model kinds, tokenizers and pretrained loading on tiny CPU models (timm test_*, tiny BERT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mmfold.config import Config, ConfigError
from mmfold.errors import UserError
from mmfold.models import (MODELS, HFTokenizer, MultiLabelModel, WordTokenizer, build_model,
                           build_tokenizer, load_pretrained)
from mmfold.models.pretrained import map_by_order
from tests.tiny import CAPTIONS, make_tiny_bert, tiny_params

CLASSES = ["cat", "dog", "car", "tree"]
KINDS = ["image", "text", "lstm_text", "fusion", "hybrid", "cnn_lstm"]
SIZE = 64


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT + WordPiece tokenizer folder, made once for the module."""
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny_bert")


def make_cfg(name: str, bert_dir: Path | None = None, **params: object) -> Config:
    """A config for the tiny variant of kind ``name`` (``cnn_lstm`` = hybrid + lstm)."""
    cfg = Config()
    cfg.model.kind = "hybrid" if name == "cnn_lstm" else name
    cfg.model.params = {**tiny_params(name, bert_dir), **params}
    cfg.train.image_size = SIZE
    return cfg


def make_batch(model: MultiLabelModel, cfg: Config, captions: list[str], max_len: int = 12) -> dict:
    """Random images and tokenised captions, as the engine would feed them."""
    torch.manual_seed(0)
    batch: dict[str, torch.Tensor] = {}
    if model.needs_image:
        batch["image"] = torch.randn(len(captions), 3, SIZE, SIZE)
    tok = build_tokenizer(cfg, list(CAPTIONS))
    if model.needs_text:
        batch.update({k: torch.from_numpy(v) for k, v in tok(captions, max_len).items()})
    return batch


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_forward_backward(name: str, bert_dir: Path) -> None:
    cfg = make_cfg(name, bert_dir)
    model = build_model(cfg, CLASSES)
    batch = make_batch(model, cfg, ["a dog on the grass", "", "a red car near a tree"])
    logits = model(batch)
    assert logits.shape == (3, len(CLASSES)) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    for group in (model.head_parameters(), model.backbone_parameters()):
        grads = [p.grad for p in group]
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-2:])


def test_every_registered_kind_is_covered() -> None:
    assert set(MODELS) == {"image", "text", "lstm_text", "fusion", "hybrid"}


@pytest.mark.parametrize("name", ["fusion", "hybrid"])
def test_vit_backbone_tokens(name: str, bert_dir: Path) -> None:
    cfg = make_cfg(name, bert_dir, backbone="test_vit")
    model = build_model(cfg, CLASSES)
    assert model.image_data_config["input_size"] == (3, SIZE, SIZE)
    model(make_batch(model, cfg, ["a cat", "a dog"])).sum().backward()


def test_flags_and_data_config(bert_dir: Path) -> None:
    flags = {n: (m.needs_image, m.needs_text) for n in KINDS
             for m in [build_model(make_cfg(n, bert_dir), CLASSES)]}
    assert flags["image"] == (True, False) and flags["text"] == (False, True)
    assert flags["lstm_text"] == (False, True) and flags["fusion"] == flags["hybrid"] == (True, True)
    image = build_model(make_cfg("image"), CLASSES)
    assert image.image_data_config["input_size"] == (3, SIZE, SIZE)
    assert len(image.image_data_config["mean"]) == 3
    assert build_model(make_cfg("text", bert_dir), CLASSES).image_data_config is None
    cfg = make_cfg("image", data_config={"mean": [0.5, 0.5, 0.5]})
    cfg.train.image_size = None
    dc = build_model(cfg, CLASSES).image_data_config
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["input_size"] == (3, 160, 160)


def test_parameter_groups_partition(bert_dir: Path) -> None:
    model = build_model(make_cfg("hybrid", bert_dir), CLASSES)
    back = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert back and head and not back & head
    assert back | head == {id(p) for p in model.parameters()}
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in names if n.startswith("backbone.")} == {
        n for n, p in model.named_parameters() if id(p) in back}  # the prefix says the group
    lstm = build_model(make_cfg("cnn_lstm"), CLASSES)
    backbone_ids = {id(q) for q in lstm.backbone_parameters()}
    text = lstm.encoder("text")
    assert text.parameters() and all(id(p) not in backbone_ids for p in text.parameters())


def test_freeze_backbone(bert_dir: Path) -> None:
    cfg = make_cfg("fusion", bert_dir)
    model = build_model(cfg, CLASSES)
    trainable, total = model.param_counts()
    assert trainable == total
    model.set_backbone_trainable(False)
    model.train()
    assert not model.encoder("image").training and model.head.training
    assert model.param_counts()[0] == sum(p.numel() for p in model.head_parameters())
    model(make_batch(model, cfg, ["a cat", "a dog"])).sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    model.set_backbone_trainable(True)
    assert model.encoder("image").training and model.param_counts()[0] == total


def test_new_model_per_build_is_independent(bert_dir: Path) -> None:
    cfg = make_cfg("lstm_text")
    a, b = build_model(cfg, CLASSES), build_model(cfg, CLASSES)
    assert a is not b and a.head[-1].weight.data_ptr() != b.head[-1].weight.data_ptr()


@pytest.mark.parametrize("name", ["text", "lstm_text", "hybrid"])
def test_padding_does_not_change_outputs(name: str, bert_dir: Path) -> None:
    cfg = make_cfg(name, bert_dir)
    model = build_model(cfg, CLASSES).eval()
    caps = ["two cats sleep on a red sofa", "a dog"]
    with torch.no_grad():
        short = model(make_batch(model, cfg, caps, max_len=12))
        long = model(make_batch(model, cfg, caps, max_len=20))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-4)


def test_pooling_choices(bert_dir: Path) -> None:
    cls = build_model(make_cfg("text", bert_dir, pooling="cls"), CLASSES).encoder("text")
    mean = build_model(make_cfg("text", bert_dir, pooling="mean"), CLASSES).encoder("text")
    ids = torch.tensor([[2, 10, 11, 3, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    assert not torch.allclose(cls(*ids), mean(*ids))
    with pytest.raises(UserError, match="pooling"):
        build_model(make_cfg("text", bert_dir, pooling="max"), CLASSES)


def test_config_errors(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backbon"):
        build_model(make_cfg("image", backbon="resnet18"), CLASSES)
    with pytest.raises(ConfigError, match="lstm.hiden"):
        build_model(make_cfg("lstm_text", lstm={"hiden": 3}), CLASSES)
    with pytest.raises(ConfigError, match="needs model.params.backbone"):
        build_model(make_cfg("image", backbone=None), CLASSES)
    with pytest.raises(ConfigError, match="no model 'resnet_nope'"):
        build_model(make_cfg("image", backbone="resnet_nope"), CLASSES)
    with pytest.raises(UserError, match="unknown model kind 'nope'"):
        build_model(_kind("nope"), CLASSES)
    with pytest.raises(UserError, match="no such file or folder: .*sentence-transformers/x"):
        build_model(make_cfg("text", text_model=str(tmp_path / "sentence-transformers/x")), CLASSES)
    with pytest.raises(ConfigError, match="multiple of heads"):
        build_model(make_cfg("hybrid", bert_dir, hybrid={"dim": 15}), CLASSES)


def _kind(kind: str) -> Config:
    """A config naming only a kind."""
    cfg = Config()
    cfg.model.kind = kind
    return cfg


def test_register_a_new_kind() -> None:
    @MODELS.register("_test_linear")
    class Linear(MultiLabelModel):
        needs_image = True

        def __init__(self, cfg: Config, classes: list[str]) -> None:
            super().__init__(classes)
            self.fc = torch.nn.Linear(3, len(classes))

        def forward(self, batch: dict) -> torch.Tensor:
            return self.fc(batch["image"].mean((2, 3)))

    model = build_model(_kind("_test_linear"), CLASSES)
    assert model({"image": torch.zeros(2, 3, 8, 8)}).shape == (2, 4)
    assert build_tokenizer(_kind("_test_linear"), ["x"]) is None


# ---- tokenizers -----------------------------------------------------------------------------


def test_build_tokenizer_per_kind(bert_dir: Path) -> None:
    kinds = {n: build_tokenizer(make_cfg(n, bert_dir), list(CAPTIONS)) for n in KINDS}
    assert kinds["image"] is None
    assert all(isinstance(kinds[n], HFTokenizer) for n in ("text", "fusion", "hybrid"))
    assert all(isinstance(kinds[n], WordTokenizer) for n in ("lstm_text", "cnn_lstm"))


def test_word_tokenizer_fits_only_given_captions() -> None:
    tok = WordTokenizer.fit(["a dog runs", "a cat, a dog"], vocab_size=100)
    assert tok.vocab[:4] == ["<pad>", "<unk>", "a", "dog"]  # by frequency, ties alphabetical
    out = tok(["A dog flies!", ""], max_len=5)
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 5)
    assert out["input_ids"][0].tolist() == [2, 3, 1, 1, 0]  # flies and ! are unseen
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert WordTokenizer.fit(["a dog runs", "a cat, a dog"], 100).key == tok.key
    assert WordTokenizer.fit(["a dog walks"], 100).key != tok.key
    assert WordTokenizer.from_dict(tok.to_dict()).key == tok.key


def test_word_tokenizer_caps_and_min_freq() -> None:
    texts = ["a a a b b c", "d"]
    assert WordTokenizer.fit(texts, vocab_size=4).vocab == ["<pad>", "<unk>", "a", "b"]
    assert WordTokenizer.fit(texts, min_freq=2).vocab == ["<pad>", "<unk>", "a", "b"]
    ids = WordTokenizer.fit(texts, vocab_size=4)(["c d a"], 3)["input_ids"]
    assert ids.max() < 4


def test_hf_tokenizer(bert_dir: Path) -> None:
    tok = HFTokenizer(bert_dir)
    out = tok(["a dog runs on the grass and the grass is green", ""], max_len=6)
    assert out["input_ids"].shape == (2, 6) and out["input_ids"].dtype == np.int64
    assert out["attention_mask"][0].tolist() == [1] * 6  # truncated
    assert out["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]  # [CLS] [SEP]
    assert HFTokenizer(bert_dir).key == tok.key and tok.key.startswith("hf-")


# ---- pretrained weights ---------------------------------------------------------------------


def _features(model: torch.nn.Module) -> torch.Tensor:
    """Deterministic pooled features for comparing two models' weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, SIZE, SIZE))


def test_load_pretrained_strips_prefix_and_classifier(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = timm.create_model("test_resnet", num_classes=0)
    result = load_pretrained(target, path)
    assert not result.missing and not result.unexpected and not result.by_order
    assert sorted(result.dropped) == ["fc.bias", "fc.weight"]
    source.reset_classifier(0)
    torch.testing.assert_close(_features(target), _features(source))


def test_load_pretrained_maps_renamed_keys_by_order(tmp_path: Path) -> None:
    source = timm.create_model("test_efficientnet", num_classes=5)
    renamed = {f"_m{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(source.state_dict().items())}
    path = tmp_path / "other_impl.pth"
    torch.save(renamed, path)
    target = timm.create_model("test_efficientnet", num_classes=0)
    result = load_pretrained(target, path)
    assert result.by_order and not result.missing and len(result.unexpected) == 2  # classifier
    source.reset_classifier(0)
    torch.testing.assert_close(_features(target), _features(source))


def test_map_by_order_checks_leaf_names() -> None:
    src = {"a.weight": torch.zeros(3), "a.bias": torch.zeros(3)}
    assert map_by_order(src, {"x.bias": torch.zeros(3), "x.weight": torch.zeros(3)}) is None
    assert map_by_order(src, {"x.weight": torch.zeros(3), "x.bias": torch.zeros(3)}) is not None


def test_load_pretrained_errors(tmp_path: Path) -> None:
    sd = timm.create_model("test_resnet", num_classes=0).state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in list(sd.items())[:10]}, partial)
    with pytest.raises(UserError, match="not in the file"):
        load_pretrained(timm.create_model("test_resnet", num_classes=0), partial)
    result = load_pretrained(timm.create_model("test_resnet", num_classes=0), partial, strict=False)
    assert result.loaded == 10 and result.missing
    with pytest.raises(UserError, match="not found"):
        load_pretrained(timm.create_model("test_resnet"), tmp_path / "none.pth")
    wide = tmp_path / "wide.pth"
    torch.save({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v for k, v in sd.items()}, wide)
    with pytest.raises(UserError, match="other shapes"):
        load_pretrained(timm.create_model("test_resnet", num_classes=0), wide)


def test_pretrained_file_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    source = timm.create_model("test_resnet", num_classes=0)
    (tmp_path / "weights").mkdir()
    torch.save(source.state_dict(), tmp_path / "weights" / "r.pth")
    model = build_model(make_cfg("image", pretrained=True, pretrained_file="weights/r.pth"), CLASSES)
    torch.testing.assert_close(_features(model.encoder("image")), _features(source))


# ---- example configs ------------------------------------------------------------------------

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "models" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_are_valid(path: Path) -> None:
    import yaml

    from mmfold.config import merge
    from mmfold.models.base import parse_params

    cfg = Config()
    merge(cfg, yaml.safe_load(path.read_text()), str(path))
    assert cfg.model.kind in MODELS
    parse_params(cfg)


def test_a_misspelt_timm_name_suggests_the_real_ones() -> None:
    """``resnet_18`` used to answer ``similar: []``; timm writes it ``resnet18`` (issue 23)."""
    from mmfold.config import ConfigError
    from mmfold.models.image import create_timm

    with pytest.raises(ConfigError, match=r"closest: \['resnet18'"):
        create_timm("resnet_18", None, {})
    with pytest.raises(ConfigError, match="'convnext_tiny'"):
        create_timm("convnext-tiny", None, {})
