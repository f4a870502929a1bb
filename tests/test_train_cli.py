"""What a user hits in `make train` / `collect` / `blend` on day one (issue 12).

Each test reproduces one report: trained-with-overrides models that could never be blended,
train.* keys that silently did nothing, FOLD=9, FORCE=1 with a typo, a locked fold's
traceback, a data config outside configs/data, the competition metric ignored by training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mmfold import fileio, paths
from mmfold.cli import main
from mmfold.config import ConfigError, load_config
from mmfold.train.runner import fold_lock
from tests.conftest import captured, write_competition

TEXT = ["--model", "demo_text", "train.epochs=2", "train.progress=false", "train.batch_size=16"]




# ------------------------------------------------------------------ 1. freshness of overrides


def test_model_trained_with_overrides_can_be_blended(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "model.params.min_df=1"]) == 0
    meta = json.loads(paths.oof_meta_file("tiny", "tfidf_lr").read_text())
    assert meta["config"]["overrides"] == ["model.params.min_df=1"]
    assert meta["config"]["model"]["params"]["min_df"] == 1
    capsys.readouterr()
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "a", "blend.method=mean"]) == 0
    # the same overrides passed to blend change nothing either
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "b", "blend.method=mean",
                 "model.params.min_df=1"]) == 0
    assert main(["collect", "--data", "tiny", "--model", "tfidf_lr"]) == 0  # without the overrides


def test_yaml_edited_after_training_with_overrides_is_caught(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "model.params.min_df=1"]) == 0
    yml = folded / "configs" / "models" / "tfidf_lr.yaml"
    yml.write_text(yml.read_text().replace("C: 2.0", "C: 0.5"))
    capsys.readouterr()
    assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "blend.method=mean"]) == 2
    err = captured(capsys)
    assert "stale" in err and "model.params.head_params.C: trained 2.0 -> now 0.5" in err


def test_folds_trained_with_other_overrides_are_not_collected(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "0", "--fold", "1"]) == 0
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "2", "model.params.min_df=1"]) == 2
    err = captured(capsys)
    assert "fold 2 was trained with other settings than fold 0" in err
    assert "model.params.min_df: fold 0 2 -> fold 2 1" in err
    assert not paths.oof_file("tiny", "tfidf_lr").exists()


# ------------------------------------------------------------------ 4. unused train.* keys


def test_train_key_a_cpu_member_ignores_is_refused(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "train.loss=focal"]) == 2
    err = captured(capsys)
    assert "['train.loss'] do nothing for model 'tfidf_lr' (kind tfidf_linear)" in err
    assert "model.params" in err  # says what it does use
    assert not paths.run_dir("tiny", "tfidf_lr", 0).exists()


def test_train_key_in_a_member_yaml_is_refused(folded: Path, capsys) -> None:
    yml = folded / "configs" / "models" / "tfidf_lr.yaml"
    yml.write_text(yml.read_text() + "train:\n  lr: 0.1\n")
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 2
    assert "['train.lr'] do nothing for model 'tfidf_lr'" in captured(capsys)


def test_image_key_on_a_text_model_is_refused(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", *TEXT, "train.augment=[{name: HorizontalFlip}]"]) == 2
    assert "['train.augment'] do nothing for model 'demo_text' (kind lstm_text)" in captured(capsys)


def test_mixed_run_applies_a_train_key_only_where_it_is_used(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr,demo_text", "train.epochs=1",
                 "train.progress=false", "--fold", "0", "--no-collect"]) == 0
    assert "train.epochs does nothing for tfidf_lr (tfidf_linear); not applied to it" in captured(capsys)
    saved = yaml.safe_load((paths.run_dir("tiny", "tfidf_lr", 0) / "config.yaml").read_text())
    assert saved["overrides"] == []
    torch_saved = yaml.safe_load((paths.run_dir("tiny", "demo_text", 0) / "config.yaml").read_text())
    assert torch_saved["train"]["epochs"] == 1


# ------------------------------------------------------------------ 6. the first day


@pytest.mark.parametrize("fold", ["9", "-1"])
def test_a_fold_the_folds_file_lacks_is_refused_before_anything_runs(folded: Path, capsys, fold: str) -> None:
    assert main(["train", "--data", "tiny", *TEXT, "--fold", fold]) == 2
    assert f"fold {fold} does not exist" in captured(capsys)
    assert not (folded / "runs").exists() or not list((folded / "runs").rglob(f"fold{fold}"))


def test_force_with_a_misspelt_param_keeps_the_finished_fold(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "0", "--no-collect"]) == 0
    rd = paths.run_dir("tiny", "tfidf_lr", 0)
    before = (rd / "done.json").read_bytes()
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "0", "--force",
                 "model.params.head_params.Cc=1"]) == 2
    assert "Cc" in captured(capsys)
    assert (rd / "done.json").read_bytes() == before
    assert not list(rd.parent.glob("fold0.bak-*"))


def test_misspelt_nested_param_on_a_finished_fold_names_the_key(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "model.params.head_params.Cc=1"]) == 2
    err = captured(capsys)
    assert "Cc" in err and "stale" not in err


def test_misspelt_torch_param_is_refused_before_training(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", *TEXT, "model.params.lstm.hiden=3"]) == 2
    assert "hiden" in captured(capsys)


def test_a_locked_fold_is_one_line_not_a_traceback(folded: Path, capsys) -> None:
    with fileio.file_lock(fold_lock("tiny", "tfidf_lr", 0)):
        assert main(["train", "--data", "tiny", "--model", "tfidf_lr", "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "is locked by" in err and "Traceback" not in err


def test_a_model_named_twice_trains_once(folded: Path, capsys) -> None:
    """MODEL=a,a with JOBS=2: each fold once (it was submitted twice: one copy found the fold
    locked by the other, and the model was not collected)."""
    assert main(["train", "--data", "tiny", "--model", "tfidf_lr,tfidf_lr", "--jobs", "2"]) == 0
    both = capsys.readouterr()
    assert "locked" not in both.out + both.err and both.out.count("tfidf_lr: CV samples-F1") == 1
    assert paths.oof_meta_file("tiny", "tfidf_lr").exists()


def test_data_config_outside_configs_data(folded: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folded / "configs" / "data" / "tiny.yaml", elsewhere / "mycomp.yaml")
    yml = str(elsewhere / "mycomp.yaml")
    assert load_config(yml).data.name == "mycomp"
    assert main(["folds", "--data", yml]) == 0
    assert (folded / "folds" / "mycomp.csv").exists()
    assert not (elsewhere / "mycomp.csv").exists()
    assert main(["train", "--data", yml, "--model", "tfidf_lr"]) == 0
    assert paths.oof_file("mycomp", "tfidf_lr").exists()


# ------------------------------------------------------------------ the metric and the console


def test_unknown_metric_is_refused_when_the_config_loads(folded: Path) -> None:
    with pytest.raises(ConfigError, match="data.metric: unknown metric 'f2'"):
        load_config("tiny", None, ["data.metric=f2"])
    with pytest.raises(ConfigError, match=r"'blend.metric' is now 'data.metric'"):
        load_config("tiny", None, ["blend.metric=micro"])


def test_the_metric_drives_training_collect_and_the_console(folded: Path, capsys) -> None:
    import numpy as np
    import pandas as pd

    from mmfold.data.competition import load_competition
    from mmfold.metrics import binarize, micro_f1, samples_f1

    assert main(["train", "--data", "tiny", *TEXT, "data.metric=micro"]) == 0
    out = captured(capsys)
    assert "CV micro-F1" in out and "honest" in out and "micro-F1 at 0.5" in out
    meta = json.loads(paths.oof_meta_file("tiny", "demo_text").read_text())
    assert meta["metric"] == "micro"
    comp = load_competition(load_config("tiny").data)
    rd = paths.run_dir("tiny", "demo_text", 0)
    oof = pd.read_parquet(rd / "oof.parquet").set_index("id")
    y = pd.DataFrame(comp.y(), index=comp.train["id"], columns=comp.classes).loc[oof.index].to_numpy()
    pred = binarize(oof[comp.classes].to_numpy(), 0.5)
    done = json.loads((rd / "done.json").read_text())
    # best.pt was chosen by micro-F1 of the validation fold: its predictions score exactly that
    assert done["best_score"] == pytest.approx(micro_f1(y, pred), abs=1e-6)
    assert not np.isclose(done["best_score"], samples_f1(y, pred))


def test_resume_says_where_it_resumes(folded: Path, capsys) -> None:
    assert main(["train", "--data", "tiny", *TEXT, "--fold", "0", "train.stop_after_epochs=1"]) == 130
    capsys.readouterr()
    assert main(["train", "--data", "tiny", *TEXT, "--fold", "0", "--no-collect"]) == 0
    assert "resuming demo_text fold 0 from epoch 1 of 2" in captured(capsys)


def test_a_value_with_spaces_passes_through_make_when_quoted(project: Path) -> None:
    """`make folds ARGS='data.root="/path with spaces"'` (the README's way) reaches the config."""
    import os
    import subprocess
    import sys

    data = write_competition(project, name="spaced")
    spaced = project / "input" / "my data"
    shutil.move(data, spaced)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MMFOLD_HOME": str(project)}
    cmd = ["make", "-s", "-C", str(repo), "folds", "DATA=spaced", f"PY={sys.executable}",
           f"ARGS=data.root=\"{spaced}\""]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (project / "folds" / "spaced.csv").exists()
    unquoted = subprocess.run([*cmd[:-1], f"ARGS=data.root={spaced}", "FORCE=1"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert unquoted.returncode != 0 and "needs quotes inside ARGS" in unquoted.stderr


def test_a_pool_worker_ends_when_its_parent_is_killed(tmp_path: Path) -> None:
    """``kill`` of ``train --jobs N`` must not leave workers running folds and holding locks."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = tmp_path / "parent.py"  # a file, not -c: spawn re-imports the parent's main module
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, time
        from mmfold.train.runner import die_with_parent

        def worker():
            die_with_parent(poll_s=0.1)
            open({str(tmp_path / "pid")!r}, "w").write(str(multiprocessing.current_process().pid))
            time.sleep(120)

        if __name__ == "__main__":
            multiprocessing.get_context("spawn").Process(target=worker).start()
            time.sleep(120)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    pid_file = tmp_path / "pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its parent by 10 s")


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody has reaped yet)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
