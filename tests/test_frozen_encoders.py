"""Frozen encoders of the CPU members by the names users write: ``hf:<repo or folder>`` and
``timm:<timm name>``, read from a hub cache in the hub's own layout that the test builds.

Each encoder is keyed by the weights it resolves to, so two encoders never share an embedding
cache, and a member that names weights missing from the cache is refused before it fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmfold import hub
from mmfold.config import ConfigError, load_config
from mmfold.cpu import encoders, members
from mmfold.data.competition import load_competition
from mmfold.train.needs import check_weights, needs_of
from tests.hubcache import add_snapshot, add_timm_folder, add_timm_model, folder_files
from tests.tiny import make_tiny_bert


@pytest.fixture
def cache(tiny: Path, offline_hub: Path) -> Path:
    """The tiny competition and an empty, offline hub cache; connections refused."""
    return offline_hub


def member(params: dict, kind: str = "frozen_embed"):
    cfg = load_config("tiny")
    cfg.model.name, cfg.model.kind, cfg.model.params = "m", kind, params
    return cfg


def test_a_sentence_encoder_by_repo_id_embeds_from_the_cache(cache: Path, tmp_path: Path) -> None:
    add_snapshot(cache, "org/enc-a", folder_files(make_tiny_bert(tmp_path / "a", seed=1)))
    add_snapshot(cache, "org/enc-b", folder_files(make_tiny_bert(tmp_path / "b", seed=2)))
    comp = load_competition(load_config("tiny").data)
    a = encoders.embed(comp, "train", "hf:org/enc-a")
    b = encoders.embed(comp, "train", "hf:org/enc-b")
    assert a.shape == (len(comp.train), 32) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    assert not np.allclose(a, b)  # other weights, other embeddings: never one cache
    fa = encoders.cache_file(comp, "train", encoders.build_encoder("hf:org/enc-a"))
    fb = encoders.cache_file(comp, "train", encoders.build_encoder("hf:org/enc-b"))
    assert fa != fb and fa.exists() and fa.name.startswith("emb_hf-org-enc-a_train_")
    cls = encoders.embed(comp, "train", "hf:org/enc-a", pooling="cls", normalize=False)
    assert not np.allclose(cls, a)


def test_a_moved_revision_is_another_cache(cache: Path, tmp_path: Path) -> None:
    add_snapshot(cache, "org/enc", folder_files(make_tiny_bert(tmp_path / "a", seed=1)))
    comp = load_competition(load_config("tiny").data)
    before = encoders.cache_file(comp, "train", encoders.build_encoder("hf:org/enc"))
    add_snapshot(cache, "org/enc", folder_files(make_tiny_bert(tmp_path / "b", seed=2)))  # main moves
    assert encoders.cache_file(comp, "train", encoders.build_encoder("hf:org/enc")) != before


def test_any_timm_model_embeds_images_with_its_hub_weights(cache: Path) -> None:
    add_timm_model(cache, "test_efficientnet.r160_in1k", seed=4)
    comp = load_competition(load_config("tiny").data)
    emb = encoders.embed(comp, "train", "timm:test_efficientnet", image_size=32)
    assert emb.shape[0] == len(comp.train) and np.isfinite(emb).all() and emb.std() > 0
    assert members.modalities(member({"encoders": ["timm:test_efficientnet"]})) == {"image"}


def test_a_timm_model_that_is_a_hub_repo_embeds_with_its_snapshots_weights_and_preprocessing(cache: Path) -> None:
    """``timm:hf-hub:org/x`` (a model published with timm's save_for_hf): built from the cached
    snapshot's config.json, its weights and its own mean/std; building the encoder reads nothing,
    so make weights can name it before the fetch."""
    import timm
    import torch

    pending = encoders.build_encoder("timm:hf-hub:acme/tiny-resnet", image_size=32)
    assert (pending.need.repo_id, pending.modality) == ("acme/tiny-resnet", "image")  # nothing in the cache yet
    commit, sd = add_timm_folder(cache, "acme/tiny-resnet", seed=4)
    comp = load_competition(load_config("tiny").data)
    emb = encoders.embed(comp, "train", "timm:hf-hub:acme/tiny-resnet", image_size=32)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
    cfg = timm.data.resolve_model_data_config(model)
    files = [comp.image_path(i) for i in comp.ids("train")[:3]]
    x = torch.from_numpy(np.stack([encoders.load_rgb(f, 32) for f in files])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(emb[:3], expected, rtol=1e-4, atol=1e-5)
    assert encoders.build_encoder("timm:hf-hub:acme/tiny-resnet").resolved().record()["revision"] == commit


def test_a_timm_model_in_a_local_folder_embeds_and_another_snapshot_is_another_cache(cache: Path,
                                                                                    tmp_path: Path) -> None:
    import shutil

    add_timm_folder(cache, "acme/one", seed=1)
    add_timm_folder(cache, "acme/two", seed=2)
    comp = load_competition(load_config("tiny").data)
    one = encoders.embed(comp, "train", "timm:hf-hub:acme/one", image_size=32)
    shutil.copytree(encoders.build_encoder("timm:hf-hub:acme/one").weights, tmp_path / "mine")
    mine = encoders.embed(comp, "train", f"timm:local-dir:{tmp_path / 'mine'}", image_size=32)
    assert np.array_equal(one, mine)  # the same weights from a folder: the same embeddings
    two = encoders.build_encoder("timm:hf-hub:acme/two", image_size=32)
    assert encoders.cache_file(comp, "train", two) != encoders.cache_file(
        comp, "train", encoders.build_encoder("timm:hf-hub:acme/one", image_size=32))
    config = tmp_path / "mine" / "config.json"  # its preprocessing edited, the file's size kept
    before = config.read_text()
    doc = json.loads(before)
    doc["pretrained_cfg"]["mean"] = [0.4, 0.5, 0.5]
    config.unlink()  # a copy of the cache's symlinked blob: write a file of its own
    config.write_text(json.dumps(doc, indent=2))
    assert len(config.read_text()) == len(before)
    edited = encoders.embed(comp, "train", f"timm:local-dir:{tmp_path / 'mine'}", image_size=32)
    assert not np.allclose(edited, mine)  # not the first folder's cached rows
    with pytest.raises(ConfigError, match="brings its own weights"):
        encoders.build_encoder("timm:hf-hub:acme/one", pretrained_file="w.pth")


def test_a_member_naming_missing_weights_is_refused_listing_all_of_them(cache: Path, tmp_path: Path) -> None:
    add_snapshot(cache, "org/present", folder_files(make_tiny_bert(tmp_path / "a")))
    cfg = member({"encoders": ["hf:org/present", "hf:org/absent", "timm:test_efficientnet"]})
    assert [n.repo_id for n in needs_of(cfg)] == ["org/present", "org/absent", "timm/test_efficientnet.r160_in1k"]
    with pytest.raises(hub.MissingWeights) as err:
        check_weights([cfg], "tiny")
    msg = str(err.value)
    assert "org/absent" in msg and "timm/test_efficientnet.r160_in1k" in msg and "org/present" not in msg
    assert "make weights DATA=tiny MODEL=m" in msg


def test_a_member_fits_on_a_hub_encoder(cache: Path, tmp_path: Path) -> None:
    add_snapshot(cache, "org/enc", folder_files(make_tiny_bert(tmp_path / "a", seed=1)))
    cfg = member({"encoders": ["hf:org/enc"], "head": "logreg"})
    comp = load_competition(cfg.data)
    n = len(comp.train)
    oof, test, _ = members.fit_member_fold(cfg, comp, np.arange(n)[: 2 * n // 3], np.arange(n)[2 * n // 3:])
    assert oof.shape == (n - 2 * n // 3, len(comp.classes)) and test.shape == (len(comp.test), len(comp.classes))


def test_a_member_records_its_weights_and_is_stale_once_they_move(cache: Path, tmp_path: Path) -> None:
    import json

    import yaml

    from mmfold import paths
    from mmfold.artifacts.manifest import check_fresh
    from mmfold.cli import main
    from mmfold.errors import UserError

    first = add_snapshot(cache, "org/enc", folder_files(make_tiny_bert(tmp_path / "a", seed=1)))
    model = {"model": {"kind": "frozen_embed", "params": {"encoders": ["hf:org/enc"], "head": "logreg"}}}
    (paths.root() / "configs" / "models" / "emb.yaml").write_text(yaml.safe_dump(model))
    assert main(["folds", "--data", "tiny"]) == 0 and main(["train", "--data", "tiny", "--model", "emb"]) == 0
    done = json.loads((paths.run_dir("tiny", "emb", 0) / "done.json").read_text())
    assert [(w["repo_id"], w["revision"]) for w in done["weights"]] == [("org/enc", first)]
    meta = json.loads(paths.oof_meta_file("tiny", "emb").read_text())
    assert meta["weights"] == done["weights"]
    comp = load_competition(load_config("tiny").data)
    check_fresh("emb", comp, test=False)
    add_snapshot(cache, "org/enc", folder_files(make_tiny_bert(tmp_path / "b", seed=2)))  # main moves on
    with pytest.raises(UserError, match=rf"stale: pretrained org/enc: {first[:12]} -> .*make train DATA=tiny MODEL=emb FORCE=1"):
        check_fresh("emb", comp, test=False)
