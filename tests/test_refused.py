"""A refused config leaves nothing behind (issue 23, item 12).

The README promises that nothing is touched before a config is validated: no empty
``runs/<data>/<model>/fold0/``, no ``.fold0.lock``, and a ``FORCE=1`` run that is refused
leaves the finished fold where it was (no ``.bak``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfold import paths
from mmfold.cli import main
from tests.conftest import captured

TEXT = ["--model", "demo_text", "--fold", "0", "train.epochs=1", "train.progress=false"]




@pytest.mark.parametrize(("override", "says"), [
    ("train.loss=nope", "unknown loss 'nope'"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.accum_steps=0", "train.accum_steps must be >= 1, got 0"),
    ("train.amp=fp8", "train.amp must be one of"),
    ("train.loss_params={gama: 2}", "train.loss_params ['gama'] unknown for loss 'bce'"),
])
def test_a_refused_override_touches_no_run_dir(folded: Path, capsys, override: str, says: str) -> None:
    assert main(["train", "--data", "tiny", *TEXT, override]) == 2
    assert says in captured(capsys)
    assert not (folded / "runs").exists(), sorted(str(p) for p in (folded / "runs").rglob("*"))


def _image_model(project: Path, backbone: str) -> None:
    """``configs/models/my_image.yaml``: a tiny image model on ``backbone``."""
    (project / "configs" / "models" / "my_image.yaml").write_text(
        f"model:\n  kind: image\n  params: {{backbone: {backbone}, pretrained: false, hidden: 16, dropout: 0.0}}\n"
        "train: {threads: 1, epochs: 1, batch_size: 16, progress: false}\n")


IMAGE = ["--model", "my_image", "--fold", "0", "--no-collect"]


def test_a_value_only_the_model_build_refuses_leaves_no_litter(folded: Path, capsys) -> None:
    """A model YAML naming a timm backbone that does not exist: refused when the model is
    built (inside the fold), and still nothing is left."""
    _image_model(folded, "test_resnet_nope")
    assert main(["train", "--data", "tiny", *IMAGE]) == 2
    assert "timm has no model 'test_resnet_nope'" in captured(capsys)
    assert not (folded / "runs").exists(), sorted(str(p) for p in (folded / "runs").rglob("*"))


def test_force_with_a_refused_config_keeps_the_finished_fold(folded: Path, capsys) -> None:
    """FORCE=1 moves a finished fold aside before training; a config refused inside the fold
    puts it back, so the refusal changes nothing."""
    _image_model(folded, "test_resnet")
    assert main(["train", "--data", "tiny", *IMAGE]) == 0
    rd = paths.run_dir("tiny", "my_image", 0)
    done = (rd / "done.json").read_text()
    before = sorted(p.name for p in rd.parent.iterdir())
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *IMAGE, "--force", "model.params.backbone=test_resnet_nope"]) == 2
    assert "timm has no model 'test_resnet_nope'" in captured(capsys)
    assert sorted(p.name for p in rd.parent.iterdir()) == before  # no .bak, nothing new
    assert (rd / "done.json").read_text() == done
