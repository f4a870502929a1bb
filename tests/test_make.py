"""The Makefile as a user meets it: ``make help`` reads as one aligned table and says what
``DATA=`` takes; ``make clean-demo`` deletes the demo's artifacts and nothing else.

Each test runs the real ``make`` on the repo's Makefile; artifacts live under ``MMFOLD_HOME``
(a temporary project), never the checkout's own folders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``make -s -C <repo> argv...``, its output captured."""
    return subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), *argv], env=env,
                          capture_output=True, text=True, timeout=60, check=True)


def _target_lines(help_text: str) -> list[str]:
    """The lines of ``make help`` that describe one target each."""
    return help_text.split("targets:\n", 1)[1].splitlines()


def test_help_lists_every_target_in_one_aligned_column() -> None:
    """A target name longer than the column (bench-predict) used to push its description one
    column right, run into the name with a single space."""
    lines = _target_lines(_make("help").stdout)
    assert len(lines) > 10
    starts = set()
    for line in lines:
        found = re.match(r"  (\S+)( {2,})\S", line)
        assert found, f"not `  <target>  <description>`: {line!r}"
        starts.add(found.end() - 1)
    assert len(starts) == 1, f"descriptions start in columns {sorted(starts)}"
    names = [line.split()[0] for line in lines]
    assert {"bench-predict", "levers", "bench-levers", "clean-demo"} <= set(names)


def test_help_says_data_takes_a_name_or_a_yaml_path() -> None:
    out = _make("help").stdout
    assert "DATA=<name|path.yaml>" in out
    assert "configs/data/<name>.yaml" in out


def test_only_bench_levers_asks_for_the_tracked_bench_tables() -> None:
    """``make levers`` writes reports/<data>/ (mmfold's default); ``make bench-levers`` passes
    ``--bench``, which alone writes docs/bench/levers.{json,md}."""
    def dry(target: str) -> str:
        return _make("-n", "-o", ".venv/.stamp", "-o", "weights", target, "DATA=demo").stdout

    assert "levers --data 'demo'" in dry("levers") and "--bench" not in dry("levers")
    assert "levers --bench --data 'demo'" in dry("bench-levers")


def _touch(root: Path, *rel: str) -> None:
    """Create each file ``rel`` under ``root``."""
    for r in rel:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        (root / r).write_text("x")


DEMO_ARTIFACTS = ("input/demo/train.csv", "folds/demo.csv", "folds/demo.labels.json", "folds/demo.source",
                  "folds/demo.csv.20240101-000000.bak", "runs/demo/demo_text/fold0/done.json",
                  "runs/demo/demo_text/.fold1.lock", "oof/demo/demo_text.parquet", "submissions/demo/log.csv",
                  "reports/demo/report.md", "sweeps/demo/s.db", "exports/demo/b/predict.py")
OTHERS = ("input/mycomp/train.csv", "folds/mycomp.csv", "folds/demo2.csv", "runs/mycomp/m/fold0/done.json",
          "oof/demo2/m.parquet", "reports/mycomp/report.md", "reports/bench/bench.json", "weights/w.pt",
          "configs/data/demo.yaml")


@pytest.mark.parametrize("own_cache", [False, True], ids=["cache-in-project", "MMFOLD_CACHE"])
def test_clean_demo_deletes_the_demos_artifacts_and_nothing_else(tmp_path: Path, own_cache: bool) -> None:
    """``clean-demo`` used to be listed as a target and do nothing at all. The cache is where
    mmfold puts it: ``cache/`` in the project, or ``$MMFOLD_CACHE``."""
    home, cache = tmp_path / "project", tmp_path / "cache"
    _touch(home, *DEMO_ARTIFACTS, *OTHERS, "cache/demo/emb.npy", "cache/mycomp/emb.npy")
    _touch(cache, "demo/emb.npy", "mycomp/emb.npy")
    env = {**os.environ, "MMFOLD_HOME": str(home)}
    env.pop("MMFOLD_CACHE", None)
    if own_cache:
        env["MMFOLD_CACHE"] = str(cache)
    _make("clean-demo", env=env)
    left = {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()}
    assert left == {*OTHERS, "cache/mycomp/emb.npy", *(["cache/demo/emb.npy"] if own_cache else [])}
    assert not (home / "runs" / "demo").exists() and not (home / "input" / "demo").exists()
    assert {p.name for p in cache.iterdir()} == ({"mycomp"} if own_cache else {"demo", "mycomp"})
    _make("clean-demo", env=env)  # nothing left to delete: still fine
