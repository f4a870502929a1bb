"""``make bench`` writes the ratios it measures (timings live there, not in assertions).

A speed ratio depends on how busy the machine is, so no test asserts one; ``mmfold bench``
measures each section against its own baseline and reports the ratio, its target and whether it
was met, in the JSON and in a summary table at the top of the markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mmfold.bench import suite as bench


def test_thresholds_section_reports_speedup_against_its_target(project: Path) -> None:
    args = argparse.Namespace(sections=["thresholds"], quick=True, out="reports/bench/quick")
    assert bench.run(args) == 0
    res = json.loads((project / "reports" / "bench" / "quick.json").read_text())["thresholds"]
    ratio = res["baseline_seconds"] / res["ours_seconds"]
    assert res["speedup"] == pytest.approx(ratio, rel=0.05)
    assert res["speedup_target"] > 1 and res["ok"] == (res["speedup"] > res["speedup_target"])
    md = (project / "reports" / "bench" / "quick.md").read_text()
    summary = md.split("## thresholds")[0]  # the table above the per-section details
    assert "| section | result | target | ok |" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| thresholds |"))
    assert f"{res['speedup']:,.1f}x" in row and f"> {res['speedup_target']}x" in row
    assert f"| {'yes' if res['ok'] else 'NO'} |" in row


def test_decoders_section_reports_its_ratios_against_the_threshold_search(project: Path) -> None:
    args = argparse.Namespace(sections=["decoders"], quick=True, out="reports/bench/quick")
    assert bench.run(args) == 0
    res = json.loads((project / "reports" / "bench" / "quick.json").read_text())["decoders"]
    for side in ("thresholds", "expected_f1"):
        assert res[side]["seconds"] >= 0 and res[side]["peak_mib"] > 0 and 0 < res[side]["heldout_f1"] <= 1
    # the ratios are of the figures reported next to them (rounded to 0.01 themselves)
    assert res["time_ratio"] == pytest.approx(res["expected_f1"]["seconds"] / res["thresholds"]["seconds"], abs=0.006)
    assert res["memory_ratio"] == pytest.approx(res["expected_f1"]["peak_mib"] / res["thresholds"]["peak_mib"], abs=0.006)
    assert "| decoders |" in (project / "reports" / "bench" / "quick.md").read_text()


def test_summary_lists_sections_without_a_headline() -> None:
    """A section that reports no headline (or no target) still gets its summary row."""
    md = bench.to_markdown({"x": {"seconds": 1.0, "section_wall_s": 1.2}})
    assert "| x | – | – | – |" in md.split("## x")[0]


def test_a_stage_printing_a_lot_to_stderr_is_measured_not_hung(tmp_path) -> None:
    """Progress bars can exceed a pipe's buffer; ``measure`` must not wait on a full pipe."""
    import sys
    import threading

    from mmfold.bench.scale import measure

    out: list[dict] = []
    job = threading.Thread(target=lambda: out.append(
        measure([sys.executable, "-c", "import sys; sys.stderr.write('x' * 500_000)"], tmp_path)), daemon=True)
    job.start()
    job.join(timeout=60)
    assert out and out[0]["seconds"] >= 0
