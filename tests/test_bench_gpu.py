"""``mmfold bench-gpu``: the smoke run end to end (every section, the report's shape, the CPU
figures it is held against), the time budget, the carried weights and wheels, and
``tools/device/prepare.sh`` building a carry folder that fits one call and installs offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest

from mmfold.bench import gpu
from tests.conftest import needs_shared

REPO = Path(__file__).resolve().parents[1]
SMOKE_ROWS = gpu.SMOKE_ROWS[0]
# CPU figures the smoke run is compared with, as docs/bench/deep.json holds them for the real data
DEEP = {"machine": "x86_64, 2 cores, no GPU", "date": "2026-01-01 00:00:00", "datasets": {"demo": {
    "rows": 2 * SMOKE_ROWS, "date": "2026-01-01 00:00:00",
    "members": {"effnet_lite0_ft": {"cv": 0.5, "s_per_fold": 100.0, "samples_per_s": 10.0},
                "minilm_ft": {"cv": 0.25, "s_per_fold": 50.0, "samples_per_s": 20.0}}, "one_fold": {}}}}
RUN_SMOKE = """
import json, sys
from mmfold.cli import main
rc = main(["bench-gpu", "--smoke", "--out", "out"])
json.dump(sorted(sys.modules), open("modules.json", "w"))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with the repo's configs and a deep.json of CPU figures for the demo, after
    ``mmfold bench-gpu --smoke`` ran in it (in a process of its own, whose imports are kept)."""
    root = tmp_path_factory.mktemp("bench_gpu")
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "docs" / "bench").mkdir(parents=True)
    (root / "docs" / "bench" / "deep.json").write_text(json.dumps(DEEP))
    env = {**os.environ, "MMFOLD_HOME": str(root)}
    done = subprocess.run([sys.executable, "-c", RUN_SMOKE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


@pytest.mark.slow
def test_smoke_run_measures_every_section_and_writes_the_report(smoke: Path) -> None:
    doc = json.loads((smoke / "out" / "gpu.json").read_text())
    assert doc["mode"] == "smoke" and isinstance(doc["machine"], str) and doc["wall_s"] > 0
    assert list(doc["sections"]) == list(gpu.SECTIONS)
    assert doc["skipped"] == {} and doc["errors"] == {}
    s = doc["sections"]
    assert s["machine"]["device"] == "cpu" and s["machine"]["torch"] and s["machine"]["python"]
    for name, fast, base, modes in (("image_speed", "bf16_channels_last", "fp32_nchw", gpu.IMAGE_MODES),
                                    ("text_speed", "bf16", "fp32", gpu.TEXT_MODES)):
        r = s[name]
        small, large = 4, 8  # the config's batch (SMOKE_TRAIN), then the larger one timed
        assert set(r["train"]) == {f"{m}@{small}" for m in modes} | {f"{base}@{large}", f"{fast}@{large}"}
        assert set(r["infer"]) == {f"{base}@{large}", f"{fast}@{large}"}
        assert all(v["samples_per_s"] > 0 and v["ms_per_step"] > 0 for v in [*r["train"].values(), *r["infer"].values()])
        assert set(r["ratios"]) == {f"train@{small}", f"train@{large}", f"infer@{large}"}
        assert r["ratios"][f"train@{small}"] == pytest.approx(
            r["train"][f"{fast}@{small}"]["samples_per_s"] / r["train"][f"{base}@{small}"]["samples_per_s"], abs=0.01)
        assert isinstance(r["ok"], bool) and ">= 2x" in r["target"]
    assert s["text_speed"]["loaded_dtype"] == "torch.float32"  # a model must not load in its file's precision
    loader = s["loader"]
    assert len(loader["workers"]) == 2 and all(v["samples_per_s"] > 0 for v in loader["workers"].values())
    assert loader["gpu_train_samples_per_s"] == s["image_speed"]["train"]["bf16_channels_last@4"]["samples_per_s"]
    assert isinstance(loader["input_bound"], bool) and loader["cache_s"] >= 0
    assert "compile_s" in s["compile"] and s["compile"]["backend"] == "eager" and isinstance(s["compile"]["ok"], bool)


@pytest.mark.slow
def test_smoke_folds_go_through_train_and_are_held_against_the_cpu_figures(smoke: Path) -> None:
    s = json.loads((smoke / "out" / "gpu.json").read_text())["sections"]
    cpu = DEEP["datasets"]["demo"]["members"]
    for name, model, gpu_setting in (("fold_image", "effnet_lite0_ft", True), ("fold_text", "minilm_ft", True),
                                     ("reference_image", "effnet_lite0_ft", False), ("reference_text", "minilm_ft", False)):
        r = s[name]
        assert r["model"] == f"{model}@{'gpu' if gpu_setting else 'cpu_setting'}" and r["fold"] == 0
        assert 0 < r["cv"] <= 1 and r["s_per_fold"] > 0 and r["rows"] == SMOKE_ROWS
        assert r["implied_5fold_s"] == pytest.approx(r["cache_built_before_s"] + 5 * r["s_per_fold"], abs=0.1)
        assert (r["cache_built_before_s"] > 0) is (name == "fold_image")  # the loader built its image cache
        # the CPU figures are for twice the rows: the full-data estimate scales, the speed-up compares like with like
        assert r["implied_5fold_full_data_s"] == pytest.approx(2 * r["implied_5fold_s"], abs=0.2)
        assert r["cpu"]["cv"] == cpu[model]["cv"] and r["cv_minus_cpu"] == pytest.approx(r["cv"] - cpu[model]["cv"], abs=1e-4)
        assert r["speedup_vs_cpu"] == pytest.approx(cpu[model]["s_per_fold"] / (2 * r["s_per_fold"]), rel=0.05)
        assert ("model.params.train_blocks=null" in r["overrides"] or "model.params.train_layers=null" in r["overrides"]) \
            is gpu_setting
        assert (smoke / "runs" / "demo_bench_gpu" / r["model"] / "fold0" / "done.json").is_file()
    assert not (smoke / "runs" / "demo_bench_gpu" / "effnet_lite0_ft").exists()  # variants only, never a user's run
    md = (smoke / "out" / "gpu.md").read_text()
    assert md.startswith("# GPU check") and "| section | result | target | ok |" in md
    for part in ("## machine", "## image_speed", "## text_speed", "## loader", "## folds", "## compile",
                 "effnet_lite0_ft@gpu", "minilm_ft@cpu_setting"):
        assert part in md


@pytest.mark.slow
def test_the_carried_wheels_cover_every_package_the_check_imports(smoke: Path) -> None:
    modules = json.loads((smoke / "modules.json").read_text())
    owners = packages_distributions()
    imported = {gpu.normalize(d) for m in modules for d in owners.get(m.split(".")[0], [])}
    pinned = {gpu.normalize(line.split("==")[0]) for line in (REPO / "requirements.txt").read_text().split()}
    carried = {gpu.normalize(line.split("==")[0]) for line in gpu.carried_requirements((REPO / "requirements.txt").read_text())}
    lacking = (imported & pinned) - gpu.DEVICE_PACKAGES
    assert lacking <= carried, f"the GPU machine lacks {sorted(lacking - carried)}: carry them"
    assert not imported & set(gpu.NOT_CARRIED), "a package left behind is imported"


def test_carried_requirements_are_the_pins_the_device_lacks() -> None:
    text = "torch==2.14.1\nalbumentations==2.0.8\n# note\nlightgbm==4.7.0\nPyYAML==6.0.3\npydantic_core==2.50.4  # x\n"
    assert gpu.carried_requirements(text) == ["albumentations==2.0.8", "pydantic_core==2.50.4"]
    real = gpu.carried_requirements((REPO / "requirements.txt").read_text())
    names = [gpu.normalize(line.split("==")[0]) for line in real]
    assert len(names) == len(set(names)) and all("==" in line for line in real)  # one pinned version each
    assert not set(names) & gpu.DEVICE_PACKAGES and "torch" not in names and "transformers" not in names


def test_a_section_that_no_longer_fits_is_skipped_and_one_that_fails_is_recorded(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []

    def boom(check: gpu.Check) -> dict:
        ran.append("boom")
        raise RuntimeError("CUDA out of memory")

    def seen(check: gpu.Check) -> dict:
        ran.append("after")
        assert json.loads((tmp_path / "gpu.json").read_text())["errors"] == {"boom": "RuntimeError: CUDA out of memory"}
        return {"headline": "ran"}

    monkeypatch.setattr(gpu, "SECTIONS", {"boom": boom, "after": seen, "slow": seen})
    sizes = gpu.Sizes(batches=(None,), warmup=0, steps=1, repeats=1, loader_batches=1, budget_s=60.0,
                      compile_backend="eager", compile_limit_s=1.0, needs_s={"boom": 0, "after": 1, "slow": 600})
    import torch

    check = gpu.Check(sizes=sizes, smoke=True, device=torch.device("cpu"), setups={}, out=tmp_path,
                      budget=gpu.Budget(sizes.budget_s))
    doc = gpu.run_check(check)
    assert ran == ["boom", "after"]
    assert "needs ~600 s" in doc["skipped"]["slow"] and doc["sections"]["after"]["headline"] == "ran"
    md = (tmp_path / "gpu.md").read_text()
    assert "| slow | skipped: time budget" in md and "| boom | error: RuntimeError: CUDA out of memory" in md


def test_compacted_weights_unpack_to_fp32_with_the_rows_kept() -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    state = {"emb.weight": torch.randn(50, 8, generator=g), "dense.weight": torch.randn(8, 8, generator=g),
             "norm.bias": torch.randn(8, generator=g), "position_ids": torch.arange(5)}
    keep = np.array([0, 3, 7, 49])
    small = gpu.compact(state, {"emb.weight": keep})
    assert "emb.weight" not in small and small["emb.weight::values"].shape == (4, 8)
    assert small["dense.weight"].dtype == torch.float16 and small["norm.bias"].dtype == torch.float32
    back = gpu.expand(small, {"emb.weight": [50, 8]})
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    assert back["emb.weight"].dtype == torch.float32 and back["position_ids"].dtype == torch.int64
    assert torch.allclose(back["emb.weight"][keep], state["emb.weight"][keep], rtol=1e-3, atol=1e-3)
    assert not back["emb.weight"][[1, 2, 48]].any()  # rows no carried caption uses
    assert torch.equal(back["norm.bias"], state["norm.bias"]) and torch.equal(back["position_ids"], state["position_ids"])
    assert torch.allclose(back["dense.weight"], state["dense.weight"], rtol=1e-3, atol=1e-3)


def python312() -> str | None:
    """A Python 3.12 interpreter on this machine (``$PYTHON312``, ``python3.12``, pyenv's), or None."""
    pyenv = Path.home() / ".pyenv" / "versions"
    for candidate in [os.environ.get("PYTHON312"), "python3.12", *sorted(map(str, pyenv.glob("3.12*/bin/python3.12")))]:
        if candidate and shutil.which(candidate):
            ok = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            if ok.returncode == 0 and ok.stdout.startswith("Python 3.12"):
                return candidate
    return None


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(python312() is None, reason="no Python 3.12 on this machine")
def test_prepare_builds_a_carry_that_fits_one_call_and_installs_offline_into_python312(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    carry = tmp_path / "carry"
    env = {**os.environ, "DEVICE_DIR": str(carry), "PY": sys.executable,
           "SHARED": str(REPO.parent / "shared" / "data")}
    done = subprocess.run(["bash", str(REPO / "tools" / "device" / "prepare.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "of the 64 MiB a call may carry" in done.stdout
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    assert size < 60 * 2**20  # the working tree travels too
    manifest = json.loads((carry / "MANIFEST.json").read_text())
    assert manifest["datasets"]["fashion"]["photos"] == gpu.CARRY_PHOTOS == manifest["datasets"]["fashion"]["rows"]
    assert manifest["datasets"]["comp5329"]["rows"] == manifest["datasets"]["comp5329"]["of"]
    wheels = sorted(carry.glob("wheels/*.whl"))
    assert any(w.name.startswith("mmfold-") for w in wheels)
    # a clean Python 3.12, no index: every wheel must match its tags
    venv = tmp_path / "venv"
    subprocess.run([python312(), "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--no-deps",
                              "--disable-pip-version-check", "--target", str(tmp_path / "site"), *map(str, wheels)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    installed = {gpu.normalize(p.name.split("-")[0]) for p in (tmp_path / "site").glob("*.dist-info")}
    assert installed == {gpu.normalize(w.name.split("-")[0]) for w in wheels}
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import iterstrat, mmfold.errors, stringzilla, simsimd"],
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    # the check unpacks the weights outside the carry (a local run must not grow the next call)
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    listing = sorted(carry.rglob("*"))
    weights = gpu.unpack(carry)
    assert sorted(carry.rglob("*")) == listing and gpu.unpack(carry) == weights
    import timm
    import torch
    from safetensors.torch import load_file

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(weights["pretrained_file"]), strict=True)
    minilm = load_file(str(Path(weights["text_model"]) / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in minilm.values() if v.is_floating_point())
    assert minilm["embeddings.word_embeddings.weight"].shape == (30522, 384)  # full shape: the ids are MiniLM's
