"""Progress lines of a blend: which stage it is in, and now and then how its study is doing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from mmfold.artifacts.studies import complete_trials

PROGRESS_EVERY_S = 5.0  # at most one trial line per this many seconds: alive, never a flood


class Progress:
    """Which stage a blend is in, as lines on ``stream`` (stderr for ``mmfold blend``).

    A blend on real data runs for minutes; without this, the terminal shows nothing until the
    end. Stages print at once; Optuna trials at most every :data:`PROGRESS_EVERY_S` seconds.
    ``Progress()`` (no stream) is silent: library callers and benchmarks pass nothing.
    """

    def __init__(self, stream: TextIO | None = None, prefix: str = "blend") -> None:
        self.stream = stream
        self.prefix = prefix
        self.where = ""

    def stage(self, message: str) -> None:
        """Print a stage line; trial lines that follow are labelled with it."""
        self.where = message
        self._print(message)

    def trial_callback(self, total: int) -> Callable[[Any, Any], None]:
        """An Optuna callback printing ``trial done/total, best`` now and then."""
        last = time.monotonic()

        def report(study: Any, trial: Any) -> None:
            nonlocal last
            if self.stream is None or time.monotonic() - last < PROGRESS_EVERY_S:
                return
            last = time.monotonic()
            done = len(complete_trials(study))
            best = f", best {study.best_value:.4f}" if done else ""
            self._print(f"{self.where}: trial {done}/{total}{best}")

        return report

    def _print(self, message: str) -> None:
        if self.stream is not None:
            print(f"{self.prefix}: {message}", file=self.stream, flush=True)
