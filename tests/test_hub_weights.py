"""Pretrained weights by the names users write, read from a hub cache in the hub's own layout.

The cache is built by the test from tiny models (:mod:`tests.hubcache`); ``HF_HUB_CACHE``
points at it and ``HF_HUB_OFFLINE=1`` is set, and any attempt to open a network connection
fails the test: training-side loading only ever reads the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmfold import hub
from mmfold.config import Config, ConfigError
from mmfold.models import build_model, weight_needs
from mmfold.models.base import parse_params
from mmfold.models.tokenizers import hf_tokenizer
from tests.hubcache import add_snapshot, add_timm_folder, add_timm_model, folder_files
from tests.tiny import make_tiny_bert, tiny_params

CLASSES = ["a", "b", "c"]


def make_cfg(kind: str, **params: object) -> Config:
    """A tiny model of ``kind`` with ``params`` over :func:`tests.tiny.tiny_params`."""
    cfg = Config()
    cfg.model.kind = kind
    cfg.model.params = {**tiny_params(kind, "unused"), **params}
    cfg.train.image_size = 32
    return cfg


@pytest.fixture
def cache(offline_hub: Path) -> Path:
    """An empty hub cache, offline, with connections refused (tests/conftest.py)."""
    return offline_hub


def image_cfg(backbone: str = "test_efficientnet", **params: object):
    return make_cfg("image", **{"backbone": backbone, "pretrained": True, **params})


def test_a_timm_name_loads_timms_weights_from_the_cache(cache: Path) -> None:
    commit, sd = add_timm_model(cache, "test_efficientnet.r160_in1k", seed=3)
    model = build_model(image_cfg(), CLASSES)
    got = model.encoder("image").model.state_dict()
    assert torch.equal(got["conv_stem.weight"], sd["conv_stem.weight"])
    assert all(torch.equal(v, sd[k]) for k, v in got.items())  # every tensor, classifier dropped
    (note,) = model.pretrained_notes()
    assert note.record["repo_id"] == "timm/test_efficientnet.r160_in1k" and note.record["revision"] == commit
    assert note.record["file"] == "model.safetensors" and len(note.record["sha256"]) == 64
    assert f"@{commit[:8]}" in note.line() and "tensors loaded, 0 left at init" in note.line()


def test_the_tag_picks_the_repo_and_a_revision_pins_the_commit(cache: Path) -> None:
    main, _ = add_timm_model(cache, "test_efficientnet.r160_in1k", seed=1)
    v1, sd_v1 = add_timm_model(cache, "test_efficientnet.r160_in1k", seed=2, revisions=("v1",))
    assert main != v1
    model = build_model(image_cfg("test_efficientnet.r160_in1k", revision="v1"), CLASSES)
    assert torch.equal(model.encoder("image").model.state_dict()["conv_stem.weight"], sd_v1["conv_stem.weight"])
    assert model.pretrained_notes()[0].record["revision"] == v1


def test_missing_weights_are_named_with_the_command_before_anything_is_built(cache: Path) -> None:
    needs = weight_needs(image_cfg())
    assert [n.repo_id for n in needs] == ["timm/test_efficientnet.r160_in1k"]
    assert hub.find(needs[0]) is None
    with pytest.raises(hub.MissingWeights, match=r"timm/test_efficientnet.r160_in1k .*make weights"):
        build_model(image_cfg(), CLASSES)


def test_random_init_must_be_written_out(cache: Path) -> None:
    model = build_model(make_cfg("image", backbone="test_efficientnet"), CLASSES)  # tiny.py: pretrained: false
    assert "random init (model.params.pretrained: false)" in model.pretrained_notes()[0].line()
    assert weight_needs(make_cfg("image", backbone="test_efficientnet")) == []
    with pytest.raises(ConfigError, match="pretrained is false but pretrained_file is set"):
        weight_needs(image_cfg("test_resnet", pretrained_file="w.pth", pretrained=False))


def test_a_timm_name_without_hub_weights_says_how_to_train_from_scratch(cache: Path) -> None:
    from timm.models import get_pretrained_cfg

    name = next(n for n in ("resnet10t", "cspresnet50d", "vit_small_patch16_18x2_224")
                if get_pretrained_cfg(n) is None or not get_pretrained_cfg(n).hf_hub_id)
    with pytest.raises(ConfigError, match="no pretrained weights on the Hugging Face hub.*pretrained: false"):
        weight_needs(image_cfg(name))


def test_predicting_rebuilds_the_model_without_reading_any_weights(cache: Path) -> None:
    model = build_model(image_cfg(), CLASSES, pretrained=False)  # nothing in the cache: still builds
    assert model.pretrained_notes()[0].line().endswith("weights from the checkpoint")


def test_a_text_repo_id_loads_model_and_tokenizer_from_the_cache(cache: Path, tmp_path: Path) -> None:
    folder = make_tiny_bert(tmp_path / "bert", seed=5)
    commit = add_snapshot(cache, "someone/tiny-bert", folder_files(folder))
    cfg = make_cfg("text", text_model="someone/tiny-bert")
    model = build_model(cfg, CLASSES)
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(folder))
    got = model.encoder("text").model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items() if k in got)
    (note,) = model.pretrained_notes()
    assert note.record["repo_id"] == "someone/tiny-bert" and note.record["revision"] == commit
    tok = hf_tokenizer(parse_params(cfg), [])
    assert str(tok.folder).endswith(commit) and tok(["a dog runs"], 8)["input_ids"].shape == (1, 8)


def test_a_text_repo_not_in_the_cache_is_a_clear_error(cache: Path) -> None:
    with pytest.raises(hub.MissingWeights, match=r"someone/absent@v2;.*make weights"):
        build_model(make_cfg("text", text_model="someone/absent", revision="v2"), CLASSES)


def test_drift_names_a_moved_revision(cache: Path) -> None:
    add_timm_model(cache, "test_efficientnet.r160_in1k", seed=1)
    rec = build_model(image_cfg(), CLASSES).pretrained_notes()[0].record
    assert hub.drift([rec]) == []
    add_timm_model(cache, "test_efficientnet.r160_in1k", seed=9)  # main now points at another commit
    (line,) = hub.drift([rec])
    assert line.startswith("pretrained timm/test_efficientnet.r160_in1k: ")


def test_the_same_weights_by_hub_name_or_local_file_build_the_same_backbone(project: Path, cache: Path) -> None:
    """What ``make bench``'s hub_load section times: both paths, one model."""
    from timm.models import get_pretrained_cfg

    from mmfold.bench.hub_load import _fake_hub
    from mmfold.models.weights import efficientnet_lite0_file

    weights = efficientnet_lite0_file()
    _fake_hub(cache, get_pretrained_cfg("efficientnet_lite0").hf_hub_id, weights)
    by_name = build_model(image_cfg("efficientnet_lite0"), CLASSES).encoder("image").model.state_dict()
    by_file = build_model(image_cfg("efficientnet_lite0", pretrained_file=str(weights)), CLASSES)
    assert all(torch.equal(v, by_name[k]) for k, v in by_file.encoder("image").model.state_dict().items())


GPU_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.stem for p in GPU_CONFIGS])
def test_gpu_box_configs_are_valid_and_name_their_hub_weights(path: Path, project: Path, cache: Path) -> None:
    """The GPU-box examples: valid as they stand, every encoder a hub repo ``make weights``
    fetches, and refused here (empty cache) before anything trains."""
    from mmfold.config import load_config
    from mmfold.train.needs import check_weights, needs_of
    from mmfold.train.runner import validate_model

    (project / "configs" / "models" / path.name).write_text(path.read_text())  # as the README says
    cfg = load_config("demo", path.stem)
    validate_model(cfg)
    needs = needs_of(cfg)
    assert needs and all(n.repo_id for n in needs)
    with pytest.raises(hub.MissingWeights, match=needs[0].repo_id):
        check_weights([cfg], "demo")


def test_building_the_augmentations_opens_no_connection() -> None:
    """albumentations asks PyPI for updates at import unless NO_ALBUMENTATIONS_UPDATE is set."""
    import subprocess
    import sys

    code = ("import os, socket\n"
            "def refuse(*a, **k):\n    os._exit(3)\n"
            "socket.socket.connect = refuse\n"
            "from mmfold.train.batches import build_augment\n"
            "assert build_augment([{'name': 'HorizontalFlip', 'p': 0.5}]) is not None\n")
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_a_fusion_member_loads_both_encoders_from_the_cache(cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    _, sd = add_timm_model(cache, "test_efficientnet.r160_in1k", seed=6)
    folder = make_tiny_bert(tmp_path / "bert", seed=7)
    add_snapshot(cache, "org/bert", folder_files(folder))
    model = build_model(make_cfg("fusion", backbone="test_efficientnet", pretrained=True, text_model="org/bert"),
                        CLASSES)
    image = model.encoder("image").model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in image.items())
    text = model.encoder("text").model.state_dict()
    assert all(torch.equal(text[k], v) for k, v in AutoModel.from_pretrained(str(folder)).state_dict().items()
               if k in text)
    assert [n.record["repo_id"] for n in model.pretrained_notes()] == ["timm/test_efficientnet.r160_in1k", "org/bert"]


def test_an_hf_hub_backbone_is_built_by_timm_from_the_cached_snapshot(cache: Path) -> None:
    commit, sd = add_timm_folder(cache, "acme/tiny-resnet", seed=4)
    cfg = image_cfg("hf-hub:acme/tiny-resnet")
    (need,) = weight_needs(cfg)
    assert need.repo_id == "acme/tiny-resnet" and not need.files  # the folder: config + weights
    model = build_model(cfg, CLASSES)
    got = model.encoder("image").model.state_dict()
    assert got.keys() == {k for k in sd if not k.startswith("fc.")}
    assert all(torch.equal(v, sd[k]) for k, v in got.items())  # exactly the cached tensors
    (note,) = model.pretrained_notes()
    assert note.record["repo_id"] == "acme/tiny-resnet" and note.record["revision"] == commit
    # predicting rebuilds the architecture from the snapshot's config, reading no weights
    again = build_model(cfg, CLASSES, pretrained=False)
    assert again.pretrained_notes()[0].line().endswith("weights from the checkpoint")
    # random init, written out, still takes the architecture from the snapshot
    fresh = build_model(image_cfg("hf-hub:acme/tiny-resnet", pretrained=False), CLASSES)
    assert not torch.equal(fresh.encoder("image").model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])


def test_an_hf_hub_backbone_not_in_the_cache_is_named_before_anything_is_built(cache: Path) -> None:
    cfg = image_cfg("hf-hub:acme/not-fetched@v2")
    (need,) = weight_needs(cfg)
    assert need.repo_id == "acme/not-fetched" and need.revision == "v2"
    with pytest.raises(hub.MissingWeights, match=r"acme/not-fetched@v2.*make weights"):
        build_model(cfg, CLASSES)
    with pytest.raises(ConfigError, match="brings its own weights"):
        weight_needs(image_cfg("hf-hub:acme/x", pretrained_file="w.pth"))


def test_a_local_dir_backbone_loads_the_folder_timm_saved(cache: Path, tmp_path: Path) -> None:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(6)
    saved = timm.create_model("test_resnet", pretrained=False)
    save_for_hf(saved, tmp_path / "mine", safe_serialization=True)
    model = build_model(image_cfg(f"local-dir:{tmp_path / 'mine'}"), CLASSES)
    got = model.encoder("image").model.state_dict()
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in got.items())
    assert model.pretrained_notes()[0].record["source"] == "local"


def test_a_local_dir_backbone_is_carried_by_export_and_its_replaced_weights_are_drift(
        cache: Path, project: Path) -> None:
    """``local-dir:weights/mine``: make export carries the folder (its config.json is the
    architecture the bundle rebuilds), and weights replaced in it are named as drift."""
    import timm
    from timm.models import save_for_hf

    from mmfold.export import read_while_predicting, weight_files

    save_for_hf(timm.create_model("test_resnet", pretrained=False), project / "weights" / "mine",
                safe_serialization=True)
    cfg = image_cfg("local-dir:weights/mine")
    rec = build_model(cfg, CLASSES).pretrained_notes()[0].record
    assert weight_files(cfg, read_while_predicting(cfg, None)) == [(project / "weights" / "mine").resolve()]
    assert hub.drift([rec]) == []
    torch.manual_seed(1)
    save_for_hf(timm.create_model("test_resnet", pretrained=False), project / "weights" / "mine",
                safe_serialization=True)
    (line,) = hub.drift([rec])
    assert line.startswith("pretrained local-dir:weights/mine: ")


def test_export_refuses_a_text_folder_of_the_project_outside_weights(cache: Path, project: Path,
                                                                     tmp_path: Path) -> None:
    from mmfold.errors import UserError
    from mmfold.export import read_while_predicting, weight_files

    make_tiny_bert(project / "input" / "models" / "bert")
    with pytest.raises(UserError, match=r"input/models/bert while predicting.*weights/ only"):
        cfg = make_cfg("text", text_model="input/models/bert")
        weight_files(cfg, read_while_predicting(cfg, None))
    make_tiny_bert(project / "weights" / "bert")
    cfg = make_cfg("text", text_model="weights/bert")
    assert weight_files(cfg, read_while_predicting(cfg, None)) == [(project / "weights" / "bert").resolve()]


@pytest.mark.parametrize(("name", "repo"), [("bert-base-uncased", True), ("google-bert/bert-base-uncased", True),
                                            ("weights/mine", False), ("input/models/x", False), ("./x", False)])
def test_a_one_word_repo_id_is_a_repo_and_a_path_in_a_folder_is_local(project: Path, name: str, repo: bool) -> None:
    (project / "input" / "models").mkdir(parents=True, exist_ok=True)
    assert (hub.folder_need(name).repo_id is not None) is repo


def test_a_folder_whose_fetch_was_cut_short_is_missing_and_sharded_weights_count_whole(
        cache: Path, tmp_path: Path) -> None:
    """snapshot_download writes config.json before the weights: a run cut short is not weights
    on disk (training would pass the check, then fail in fold 0). A shard index counts when
    every shard it lists is there."""
    import json

    files = folder_files(make_tiny_bert(tmp_path / "bert"))
    weights = files.pop("model.safetensors")
    add_snapshot(cache, "org/cut", files)
    assert hub.find(hub.folder_need("org/cut")) is None
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    shards = {"model.safetensors.index.json": json.dumps(index).encode(), "model-00001-of-00002.safetensors": weights}
    add_snapshot(cache, "org/sharded", {**files, **shards})
    assert hub.find(hub.folder_need("org/sharded")) is None  # shard 2 of 2 missing
    add_snapshot(cache, "org/sharded", {**files, **shards, "model-00002-of-00002.safetensors": weights})
    assert hub.find(hub.folder_need("org/sharded")).file == "model.safetensors.index.json"


def test_a_branch_with_slashes_copies_into_another_cache(cache: Path, tmp_path: Path) -> None:
    add_snapshot(cache, "org/bert", folder_files(make_tiny_bert(tmp_path / "bert")), revisions=("refs/pr/3",))
    res = hub.require(hub.folder_need("org/bert", "refs/pr/3"), "make weights")
    hub.copy_to_cache(res, tmp_path / "other")
    assert (tmp_path / "other" / "models--org--bert" / "refs" / "refs" / "pr" / "3").read_text() == res.revision


def test_a_missing_pip_shipped_folder_points_at_make_weights(cache: Path, project: Path) -> None:
    cfg = make_cfg("text", text_model="weights/mpnet")
    with pytest.raises(hub.MissingWeights, match=r"no such file or folder: .*weights/mpnet.*`make weights` makes"):
        build_model(cfg, CLASSES)
