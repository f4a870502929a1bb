"""Shared fixtures: an isolated project root and a tiny competition builder."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent (real-data fixtures)")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project root (``MMFOLD_HOME``) with the repo's configs copied in."""
    repo = Path(__file__).resolve().parents[1]
    for sub in ("configs/data", "configs/models"):
        (tmp_path / sub).mkdir(parents=True)
        for f in (repo / sub).glob("*.yaml"):
            (tmp_path / sub / f.name).write_text(f.read_text())
    monkeypatch.setenv("MMFOLD_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small demo data (150 train / 30 test rows), made once per session; copy, never modify."""
    from mmfold.data.demo import make_demo

    root = tmp_path_factory.mktemp("demo_template")
    make_demo(root / "input" / "demo", n_train=150, n_test=30)
    return root


def install_demo(project: Path, template: Path) -> Path:
    """Copy the small demo data into ``project`` and write its folds."""
    from mmfold.cli import main

    shutil.copytree(template / "input", project / "input")
    assert main(["folds"]) == 0
    return project


def write_competition(
    root: Path,
    name: str = "tiny",
    n_train: int = 40,
    n_test: int = 10,
    n_labels: int = 4,
    images: bool = True,
    seed: int = 0,
) -> Path:
    """Write a small labelled competition + ``configs/data/<name>.yaml`` under ``root``.

    Returns the data folder. Labels are ints ``1..n_labels`` and every row has at least one.
    """
    rng = np.random.default_rng(seed)
    data = root / "input" / name
    (data / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_test):
        labels = sorted({int(rng.integers(1, n_labels + 1)) for _ in range(int(rng.integers(1, 3)))})
        rows.append((f"{i}.jpg", " ".join(map(str, labels)), f"caption with {' and '.join(f'tag{l}' for l in labels)}"))
        if images:
            arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / "images" / f"{i}.jpg")
    (data / "train.csv").write_text("ImageID,Labels,Caption\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows[:n_train]))
    (data / "test.csv").write_text("ImageID,Caption\n" + "".join(f"{a},{c}\n" for a, _, c in rows[n_train:]))
    cfg = {"data": {"root": f"input/{name}", "image_dir": "images" if images else None}, "folds": {"n_splits": 3}}
    (root / "configs" / "data").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "data" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return data


@pytest.fixture
def tiny(project: Path) -> Path:
    """A tiny competition named ``tiny`` inside the isolated project; returns its data folder."""
    return write_competition(project)


@pytest.fixture
def folded(project: Path) -> Path:
    """The tiny competition (with images) and its folds written."""
    from mmfold.cli import main

    write_competition(project)
    assert main(["folds", "--data", "tiny"]) == 0
    return project


def captured(capsys: pytest.CaptureFixture) -> str:
    """Everything a command printed so far, stdout then stderr."""
    out = capsys.readouterr()
    return out.out + out.err


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache (``HF_HUB_CACHE``), offline, with every network
    connection refused: code under test may only read the cache."""
    import socket

    root = tmp_path / "hf_cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a network connection was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return root


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_a_terminal_gives_it() -> None:
    """Ctrl-C raises KeyboardInterrupt in the test process and its children, as at a terminal.

    A shell without job control starts a background command (`make test &`, `nohup ... &`)
    with SIGINT ignored, and Python keeps an inherited SIG_IGN: the Ctrl-C tests would then
    press a key nobody listens to, and pass it on to every process they start."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _stop_signals_left_as_found() -> Iterator[None]:
    """Every test leaves this process's Ctrl-C and SIGTERM handling as it found it: a handler
    (or SIG_IGN) left behind makes a later test's Ctrl-C do nothing, and it is inherited by the
    processes later tests start. The test that leaves one fails, naming it; the handler is put
    back either way."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    left = {s: signal.getsignal(s) for s in STOP_SIGNALS if signal.getsignal(s) is not before[s]}
    for s in left:
        signal.signal(s, before[s])
    assert not left, f"this test left signal handlers changed: {[(signal.Signals(s).name, h) for s, h in left.items()]}"
