"""``train.progress=false`` hides the progress bars, not the per-epoch lines (issue 23, item 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfold.cli import main
from tests.conftest import write_competition

TEXT = ["--model", "demo_text", "--fold", "0", "--no-collect", "train.epochs=2", "train.batch_size=16"]


@pytest.fixture
def folded(project: Path) -> Path:
    """The tiny competition (captions only) and its folds."""
    write_competition(project, images=False)
    assert main(["folds", "--data", "tiny"]) == 0
    return project


def _bar_drawn(err: str) -> bool:
    """tqdm redraws its bar in place with carriage returns and a rate."""
    return "\r" in err and "it/s" in err


def test_progress_false_keeps_the_epoch_lines_and_drops_the_bars(folded: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *TEXT, "train.progress=false"]) == 0
    out = capsys.readouterr()
    for epoch in (0, 1):
        assert f"demo_text fold 0 epoch={epoch} " in out.out, out.out
    assert "valid_f1=" in out.out
    assert not _bar_drawn(out.err) and not _bar_drawn(out.out), out.err


def test_progress_true_draws_the_bars_too(folded: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *TEXT, "train.progress=true"]) == 0
    out = capsys.readouterr()
    assert "demo_text fold 0 epoch=1 " in out.out, out.out
    assert _bar_drawn(out.err), out.err
