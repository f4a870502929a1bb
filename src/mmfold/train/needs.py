"""Which pretrained weights a run reads, found before anything trains, and ``make weights``.

Every model of a run names its weights (a torch kind: its image backbone and text model; a CPU
member: the frozen encoders it embeds with). :func:`check_weights` looks each one up on disk
(the hub cache, or a local path) without building a model and refuses the run with one message
naming every missing weight and the ``make weights`` command that fetches them all, so no fold
starts, and nothing waits on a network, for weights that are not there. :func:`fetch_all` is
that command's work: the same list, fetched into the cache with huggingface_hub's client.

``mmfold weights --data x [--model a,b]`` (``make weights DATA=x [MODEL=a,b]``) first makes
the files of the pip-shipped weight packages (:mod:`mmfold.models.weights`), then fetches what
the run's models name. It is the only step that opens a connection: ``HF_ENDPOINT`` and the
hub's token are read by huggingface_hub as usual.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mmfold import hints, hub
from mmfold.config import Config, load_config, model_names


def needs_of(cfg: Config) -> list[hub.Need]:
    """The weights one model reads when it trains, each once."""
    from mmfold.cpu.members import MEMBERS

    if cfg.model.kind in MEMBERS:
        from mmfold.cpu.members import encoder_needs

        needs = encoder_needs(cfg)
    else:
        from mmfold.models import weight_needs

        needs = weight_needs(cfg)
    return list(dict.fromkeys(needs))


def missing(cfgs: Sequence[Config]) -> dict[str, list[hub.Need]]:
    """Per model name, the weights it reads that are not on this machine."""
    out: dict[str, list[hub.Need]] = {}
    for cfg in cfgs:
        gone = [n for n in needs_of(cfg) if hub.find(n) is None]
        if gone:
            out[cfg.model.name] = gone
    return out


def check_weights(cfgs: Sequence[Config], data: str) -> None:
    """Refuse a run whose weights are not all on disk: one message, every one, the command.

    Raises:
        MissingWeights: naming each missing repo id or path, and ``make weights`` for exactly
            the models that need it.
    """
    gone = missing(cfgs)
    if gone:
        needs = [n for ns in gone.values() for n in ns]
        raise hub.MissingWeights(hub.missing_message(needs, hints.make("weights", data, model=list(gone))))


def fetch_all(cfgs: Sequence[Config]) -> list[tuple[str, hub.Need, Path]]:
    """Fetch every hub weight the models read into the cache; ``(model, need, path)`` each.

    Local paths are only checked (they are the user's to provide). Writes nothing else.
    """
    done: dict[hub.Need, Path] = {}
    out = []
    for cfg in cfgs:
        for need in needs_of(cfg):
            if need not in done:
                done[need] = hub.fetch(need)
            out.append((cfg.model.name, need, done[need]))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--model a,b`` (default: the data config's models)."""
    p.add_argument("--model", default=None, help="models whose weights to fetch (default: data.models)")
    p.add_argument("--no-packages", action="store_true",
                   help="skip making the pip-shipped weight files under weights/")


def run(args: argparse.Namespace) -> int:
    """Make the pip-shipped weight files, then fetch every weight the run's models name."""
    if not args.no_packages:
        from mmfold.models.weights import make_package_files

        make_package_files(force=bool(args.force))
    base = load_config(args.data, None, args.overrides)
    if not (args.model or base.data.models):
        print(f"no models listed for '{args.data}' (data.models) and no MODEL=: no hub weights to fetch")
        return 0
    cfgs = [load_config(args.data, name, args.overrides) for name in model_names(base, args.model)]
    for model, need, path in fetch_all(cfgs):
        print(f"{model:18} {need.describe()} -> {path}")
    return 0
