"""``make bench`` section "decoders": expected-F1 decoding against per-label thresholds on the
same probabilities, time and peak memory as ratios measured in the same run, plus each one's
samples-F1 on held-out rows (fitted on one half, scored on the other)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any


from mmfold.bench.thresholds import synthetic
from mmfold.ensemble.decoders import ExpectedF1Decoder
from mmfold.ensemble.thresholds import ThresholdOptimizer
from mmfold.metrics import samples_f1

TIME_RATIO_TARGET = 3.0  # "same class" as the threshold search: at most this many times its time
MEMORY_RATIO_TARGET = 2.0


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Result, seconds, and peak traced MiB (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def benchmark(quick: bool = False) -> dict[str, Any]:
    """Fit on the first half of a synthetic 200,000 x 200 table and predict the second half,
    with each decoder; report time/memory ratios and held-out F1 (``quick``: 4,000 x 20)."""
    n, L = (4_000, 20) if quick else (200_000, 200)
    P, y = synthetic(n, L, seed=0)
    fit, te = slice(0, n // 2), slice(n // 2, None)
    res: dict[str, Any] = {"rows": n, "labels": L}
    for name, make in (("thresholds", ThresholdOptimizer), ("expected_f1", ExpectedF1Decoder)):
        pred, s, mib = _timed(lambda: make().fit(P[fit], y[fit]).predict(P[te]))
        res[name] = {"seconds": round(s, 4), "peak_mib": round(mib, 2),
                     "heldout_f1": round(samples_f1(y[te], pred), 4)}
    t_ratio = res["expected_f1"]["seconds"] / max(res["thresholds"]["seconds"], 1e-9)
    m_ratio = res["expected_f1"]["peak_mib"] / max(res["thresholds"]["peak_mib"], 1e-9)
    res.update({
        "time_ratio": round(t_ratio, 2), "memory_ratio": round(m_ratio, 2),
        "ok": t_ratio <= TIME_RATIO_TARGET and m_ratio <= MEMORY_RATIO_TARGET,
        "headline": (f"expected-F1 {res['expected_f1']['seconds']:.1f} s / {res['expected_f1']['peak_mib']:.0f} MiB "
                     f"vs thresholds {res['thresholds']['seconds']:.1f} s / {res['thresholds']['peak_mib']:.0f} MiB "
                     f"({t_ratio:.2f}x time, {m_ratio:.2f}x memory) at {n:,} x {L}; held-out F1 "
                     f"{res['expected_f1']['heldout_f1']:.4f} vs {res['thresholds']['heldout_f1']:.4f}"),
        "target": f"<= {TIME_RATIO_TARGET}x time, <= {MEMORY_RATIO_TARGET}x memory",
    })
    return res
