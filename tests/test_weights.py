"""``mmfold weights``: the installed offline packages become loadable files under weights/."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from mmfold.models import weights
from mmfold.cli import main
from mmfold.errors import UserError
from mmfold.models import HFTokenizer, load_pretrained

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with ``weights/`` made once by the real command."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFOLD_HOME", str(root))
        assert main(["weights"]) == 0
    return root


@pytest.fixture()
def at_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with ``MMFOLD_HOME`` pointing at :func:`home`."""
    monkeypatch.setenv("MMFOLD_HOME", str(home))
    return home


def test_efficientnet_file_loads_by_name_with_nothing_missing(at_home: Path) -> None:
    path = weights.efficientnet_lite0_file()
    assert path == at_home / "weights" / "efficientnet_lite0.safetensors"
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    random_out = model.eval()(x)
    result = load_pretrained(model, path)
    assert not result.missing and not result.unexpected and not result.by_order
    assert result.dropped == ["classifier.bias", "classifier.weight"]
    assert not torch.allclose(model.eval()(x), random_out)
    assert not torch.allclose(model.bn2.running_var, torch.ones_like(model.bn2.running_var))


def test_weights_are_idempotent(at_home: Path) -> None:
    path = weights.efficientnet_lite0_file()
    mtime = path.stat().st_mtime_ns
    assert main(["weights"]) == 0
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_minilm_folder_is_a_local_hf_model(at_home: Path) -> None:
    from transformers import AutoModel

    folder = weights.minilm_dir()
    assert folder == at_home / "weights" / "minilm"
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    assert model.config.hidden_size == 384
    ids = HFTokenizer("weights/minilm")(["a dog on a sofa"], 8)
    assert ids["input_ids"][0, 0] == 101 and ids["attention_mask"].sum() == 7  # [CLS] .. [SEP]


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "MINILM_PACKAGE", ("no_such_weights_pkg", "no-such-weights-pkg"))
    with pytest.raises(UserError, match="'no-such-weights-pkg' is not installed"):
        weights.minilm_dir()
    assert main(["weights"]) == 2


@pytest.mark.shared
@pytest.mark.skipif(not COCO.is_dir(), reason="needs ../shared/data/coco_mini")
def test_efficientnet_recognises_a_real_zebra(at_home: Path) -> None:
    import pandas as pd
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    train = pd.read_csv(COCO / "train.csv")
    image_id = train[train.Caption.str.contains("zebras grazing")].ImageID.iloc[0]
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    load_pretrained(model, weights.efficientnet_lite0_file())
    cfg = {**resolve_model_data_config(model), "mean": weights.EFFNET_MEAN, "std": weights.EFFNET_STD}
    x = create_transform(**cfg)(Image.open(COCO / "images" / image_id).convert("RGB"))
    with torch.no_grad():
        probs = model.eval()(x[None]).softmax(-1)[0]
    assert probs.argmax().item() == 340 and probs.max() > 0.5  # ImageNet class 340: zebra


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "models" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_build_with_real_weights(path: Path, at_home: Path) -> None:
    import yaml

    from mmfold.config import Config, merge
    from mmfold.models import build_model, build_tokenizer

    cfg = Config()
    merge(cfg, yaml.safe_load(path.read_text()), str(path))
    cfg.train.image_size = 64
    model = build_model(cfg, ["a", "b", "c"]).eval()
    batch = {"image": torch.randn(2, 3, 64, 64)} if model.needs_image else {}
    tok = build_tokenizer(cfg, ["a dog on a sofa", "a red car"])
    if tok is not None:
        batch.update({k: torch.from_numpy(v) for k, v in tok(["a dog", "a car"], 8).items()})
    with torch.no_grad():
        assert model(batch).shape == (2, 3)
