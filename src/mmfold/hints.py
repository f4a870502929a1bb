"""The one place that builds the commands mmfold's messages suggest, so each one pastes and runs.

A hint must carry the ``DATA=`` the user typed (a data YAML given by path, not its stem, which
names no config), every model it applies to, and nothing that would run on another dataset.
The CLI records the ``--data`` argument of the command it runs (:func:`remember_data`), in the
environment so that worker processes of ``--jobs N`` inherit it; a message then passes the
dataset's artifact key and gets the argument back when it keys to that dataset.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable

from mmfold import paths

# The --data argument of the running command, as typed (inherited by spawned workers).
DATA_ENV = "MMFOLD_DATA_ARG"


def remember_data(data: str) -> None:
    """Record the running command's ``--data`` argument for the hints it may print."""
    os.environ[DATA_ENV] = data


def data_argument(data: str) -> str:
    """What to write after ``DATA=`` for the dataset keyed ``data``: the argument the user gave
    when it keys to this dataset (a YAML path stays a path), else ``data`` itself."""
    given = os.environ.get(DATA_ENV)
    if given and given != data:
        try:
            if paths.data_name(given) == paths.data_name(data):
                return given
        except OSError:  # the YAML went away since: the key is all we have
            pass
    return data


def _names(value: str | Iterable[str] | int | Iterable[int] | None) -> str | None:
    """``a`` or ``['a', 'b']`` -> ``a,b``; a fold list the same way; None stays None."""
    if value is None:
        return None
    if isinstance(value, (str, int)):
        return str(value)
    items = [str(v) for v in dict.fromkeys(value)]
    return ",".join(items) if items else None


def make(target: str, data: str, *, model: str | Iterable[str] | None = None,
         fold: int | Iterable[int] | None = None, force: bool = False, **extra: str) -> str:
    """``make <target> DATA=<as given> [MODEL=a,b] [FOLD=k] [FORCE=1] [KEY=value ...]``.

    Args:
        target: The make target (``train``, ``predict``, ``collect``...).
        data: The dataset's key (``cfg.data.name``) or the ``--data`` argument itself.
        model: One model or several (all of them: a hint never names only the first).
        fold: One fold or several; a hint for one fold says which.
        force: Add ``FORCE=1`` (only for artifacts that belong to this dataset).
        extra: Further ``KEY=value`` pairs, in the order given (``NAME=``, ``TEST=``).
    """
    parts = ["make", target, f"DATA={shlex.quote(data_argument(data))}"]
    models, folds = _names(model), _names(fold)
    if models:
        parts.append(f"MODEL={shlex.quote(models)}")
    if folds is not None:
        parts.append(f"FOLD={folds}")
    if force:
        parts.append("FORCE=1")
    parts += [f"{k}={shlex.quote(str(v))}" for k, v in extra.items() if v is not None]
    return " ".join(parts)
