"""``mmfold bench-deep`` end to end on the small demo (tiny members standing in for the real
ones): every member through train + collect on all folds, a one-fold member, both blends,
the committed JSON's shape, the targets and the markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mmfold.bench import deep
from tests.conftest import install_demo


@pytest.fixture
def demo(project: Path, demo_template: Path) -> Path:
    return install_demo(project, demo_template)


@pytest.mark.slow
def test_bench_deep_runs_members_blends_and_writes_the_json(demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deep, "CPU_MEMBERS", {"demo": ["tfidf_lr"]})
    monkeypatch.setattr(deep, "DEEP_MEMBERS", {"demo": ["demo_text"]})
    monkeypatch.setattr(deep, "WITHOUT", {"demo": ["demo_text"]})
    monkeypatch.setattr(deep, "ONE_FOLD", {"demo": ["demo_image"]})
    monkeypatch.setattr(deep, "TARGETS", {"demo": {"text": 0.0, "blend": 1.01}})
    args = argparse.Namespace(datasets="demo", shared=str(demo / "input"), jobs=2, fresh=False,
                              skip_one_fold=False, overrides=["train.epochs=1", "blend.n_trials=3"])
    assert deep.run(args) == 0
    doc = json.loads((demo / "reports" / "bench" / "deep.json").read_text())
    assert {"machine", "date", "datasets"} <= set(doc) and doc["jobs"] == 2
    r = doc["datasets"]["demo"]
    for name, fine_tuned in (("tfidf_lr", False), ("demo_text", True)):
        m = r["members"][name]
        assert m["fine_tuned"] is fine_tuned and 0 < m["cv"] <= 1 and m["cv_std"] >= 0 and m["train_s"] > 0
        assert isinstance(m["kind"], str) and "samples_per_s" in m
    assert r["members"]["demo_text"]["samples_per_s"] > 0  # the engine counts training rows/s
    assert r["blend"]["models"] == ["tfidf_lr", "demo_text"] and 0 < r["blend"]["cv"] <= 1
    assert r["blend_cpu_only"]["models"] == ["tfidf_lr"]
    assert r["blend_without"]["models"] == ["tfidf_lr"] and r["blend_without"]["without"] == ["demo_text"]
    one = r["one_fold"]["demo_image"]
    assert one["fold"] == 0 and 0 < one["cv"] <= 1 and one["train_s"] > 0
    assert not (demo / "oof" / "demo" / "demo_image.parquet").exists()  # one fold: never collected
    assert r["targets"]["text"]["met"] is True and r["targets"]["blend"]["met"] is False
    md = (demo / "reports" / "bench" / "deep.md").read_text()
    assert "| demo_text | lstm_text | yes |" in md and "MISSED" in md
    assert "| blend, deep + CPU without demo_text |" in md
    stamp = (demo / "runs" / "demo" / "demo_text" / "fold0" / "done.json").stat().st_mtime_ns
    other = {**r, "date": "earlier"}
    doc["datasets"]["other"] = other
    (demo / "reports" / "bench" / "deep.json").write_text(json.dumps(doc))
    assert deep.run(args) == 0  # a rerun keeps the finished folds (a cut-off run continues)
    assert (demo / "runs" / "demo" / "demo_text" / "fold0" / "done.json").stat().st_mtime_ns == stamp
    again = json.loads((demo / "reports" / "bench" / "deep.json").read_text())
    assert again["datasets"]["other"] == other  # a dataset not run this time is kept, with its date
    assert again["datasets"]["demo"]["date"] != "earlier"
    assert "## other" in (demo / "reports" / "bench" / "deep.md").read_text()
