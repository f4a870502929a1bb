"""Fingerprints of everything a prediction depends on, so stale artifacts are caught.

Each fold's ``done.json`` and each collected ``oof/<data>/<model>.json`` store these hashes.
If the folds, the label vocabulary, the data files or the model's config change afterwards,
:func:`stale` says exactly which, and nothing stale is collected or blended. The pretrained
weights a model loaded (repo, resolved commit, file hash) are recorded the same way: weights
that now resolve to something else make it stale (:func:`check_weights_fresh`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmfold import hints, hub, paths
from mmfold.config import (NOT_LEARNING, RUN_LENGTH_KEYS, Config, describe_diff, flatten,
                           learning_diff, load_config, model_yaml, stable_hash, with_defaults)
from mmfold.data.competition import Competition
from mmfold.errors import UserError


def file_hash(path: Path) -> str:
    """Short sha256 of a file's bytes ('' if absent)."""
    if not path.exists():
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def learning_view(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened settings a model's predictions depend on: its model and train sections
    (less what does not change learning, :data:`mmfold.config.NOT_LEARNING` and the run-length
    keys) and the data columns and metric it was trained to read and optimise."""
    flat = flatten(with_defaults(config))
    keep = {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "train")}
    keep |= {f"data.{c}": flat.get(f"data.{c}") for c in DATA_LEARNING_KEYS}
    return {k: v for k, v in keep.items() if k not in RUN_LENGTH_KEYS and not k.startswith(NOT_LEARNING)}


def portable_view(config: dict[str, Any]) -> dict[str, Any]:
    """:func:`learning_view` as a saved model is checked against when it predicts elsewhere:
    ``data.image_dir`` says only *whether* images are read, since where they live (a bundle's
    ``--images``, a moved data folder) changes nothing the model learned."""
    view = learning_view(config)
    view["data.image_dir"] = bool(view.get("data.image_dir"))
    return view


# data.* settings that change what a model learns from the same files
DATA_LEARNING_KEYS = ("id_col", "label_col", "caption_col", "image_dir", "image_ext", "label_sep", "metric",
                      "drop_bad_images")


def model_config_hash(cfg: Config | dict[str, Any]) -> str:
    """Hash of :func:`learning_view`: equal hashes, same training."""
    return stable_hash(learning_view(cfg.to_dict() if isinstance(cfg, Config) else cfg))


def config_drift(data: str, model: str, trained: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """How the config a run claims to be (its YAML files now, plus the overrides it was
    trained with) differs from the resolved config it was trained with (``trained``).

    Empty when nothing that changes learning moved. A model whose YAML no longer exists
    cannot be re-resolved and is taken as it was trained.
    """
    if paths.is_variant(model) or not model_yaml(model, trained.get("source") or data).exists():  # sweep/ablation variants, deleted YAML
        return {}
    claimed = load_config(trained.get("source") or data, model, trained.get("overrides", [])).to_dict()
    return learning_diff(learning_view(trained), learning_view(claimed))


def data_fingerprints(comp: Competition) -> dict[str, str]:
    """Current hashes of what a model *learns from*: the folds file, the label vocabulary and
    the train file. A change here means retraining; the test set is :func:`testset_key`."""
    d = comp.cfg
    return {"folds": file_hash(paths.folds_file(d.name)), "labels": stable_hash(comp.classes),
            "train": file_hash(paths.resolve(d.root) / d.train_csv)}


def testset_key(comp: Competition) -> str:
    """Hash of the test set a prediction is for: the test file's bytes and, with images, each
    test image's name, size and mtime ('' without a test set).

    A changed test set needs new test predictions (``make predict``), never retraining, so it
    is kept apart from :func:`data_fingerprints`; prediction files are keyed by it.
    """
    d = comp.cfg
    if comp.test is None or not d.test_csv:
        return ""
    images = []
    if comp.has_images:
        for i in comp.ids("test"):
            st = comp.image_path(i).stat()
            images.append((i, st.st_size, st.st_mtime_ns))
    return stable_hash([file_hash(paths.resolve(d.root) / d.test_csv), images])[:16]


def fingerprints(cfg: Config, comp: Competition) -> dict[str, str]:
    """Current hashes of folds, labels, train file and model config, and of the test set."""
    return {**data_fingerprints(comp), "config": model_config_hash(cfg), "test": testset_key(comp)}


def fold_seconds(done: dict[str, Any]) -> float:
    """Seconds a trained fold recorded in its ``done.json`` (``done``): ``wall_s`` (torch folds:
    caches, training, validation and prediction) where the engine wrote it, else
    ``train_time_s`` (CPU members time their whole fold). What benchmarks and levers charge."""
    return float(done.get("wall_s", done.get("train_time_s", 0.0)))


def upstream_keys(data: str, config: list[str], trained: list[str], fold: int) -> dict[str, str]:
    """Keys of the other models fold ``fold`` of a model was made from (a student's base and
    teachers); ``data`` is the ``--data`` it was trained with (a name or a YAML path).

    ``config:<m>`` hashes what ``m``'s YAML resolves to now (a student refits its teachers and
    builds its base from them); ``trained:<m>@<k>`` hashes ``m``'s fold-k ``done.json``
    (rewritten whenever that fold is retrained: a student's fold k learns from its
    pseudo-teachers' fold-k files). A model whose YAML or fold is gone gets no key: what was
    made from it is taken as it was made, as :func:`config_drift` takes a deleted YAML."""
    keys = {f"config:{m}": stable_hash(learning_view(load_config(data, m).to_dict()))[:16]
            for m in config if model_yaml(m, data).exists()}
    for m in trained:
        done = paths.run_dir(data, m, fold) / "done.json"
        if done.exists():
            keys[f"trained:{m}@{fold}"] = file_hash(done)
    return keys


def upstream_drift(data: str, recorded: dict[str, str]) -> list[str]:
    """The upstream models (see :func:`upstream_keys`) that changed since ``recorded`` (the
    keys of one fold or of several, merged)."""
    now: dict[str, str] = {}
    for key in recorded:
        kind, _, name = key.partition(":")
        model, _, fold = name.partition("@")
        now |= upstream_keys(data, [model] if kind == "config" else [], [model] if kind == "trained" else [],
                             int(fold or 0))
    return sorted({k.split(":", 1)[1].split("@")[0] for k, v in recorded.items() if k in now and now[k] != v})


def check_upstream(data: str, model: str, recorded: dict[str, str]) -> None:
    """Refuse a model made from another version of its upstream models.

    Raises:
        UserError: naming the upstream models that changed and the command that fixes it.
    """
    changed = upstream_drift(data, recorded)
    if changed:
        raise UserError(f"model '{model}' is stale: {', '.join(changed)} (its base or teachers) changed or "
                        f"were retrained since it was trained; retrain it ({hints.make('train', data, model=model, force=True)})")


def fold_weights(data: str, model: str, infos: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The pretrained weights every fold of a model loaded (``done.json``'s ``weights``),
    refusing folds that loaded different ones (a revision moved between two folds)."""
    first = infos[0].get("weights", []) if infos else []
    for k, info in enumerate(infos):
        if info.get("weights", []) != first:
            raise UserError(f"{model}: fold {k} loaded other pretrained weights than fold 0 "
                            f"({_weights_line(info.get('weights', []))} vs {_weights_line(first)}); retrain it "
                            f"({hints.make('train', data, model=model, fold=k, force=True)})")
    return list(first)


def _weights_line(records: Sequence[dict[str, str]]) -> str:
    """``repo@commit8, file sha8`` for messages."""
    return ", ".join(f"{r.get('repo_id') or r.get('name')}@{(r.get('revision') or r.get('sha256') or '?')[:8]}"
                     for r in records) or "none"


def check_weights_fresh(data: str, model: str, records: Sequence[dict[str, str]]) -> None:
    """Refuse a model whose pretrained weights now resolve to something else (a moved
    revision, a replaced local file): as stale as a changed config.

    Raises:
        UserError: naming each changed weight and the retrain command.
    """
    changed = hub.drift(records)
    if changed:
        raise UserError(f"model '{model}' is stale: {'; '.join(changed)} since it was trained; retrain it "
                        f"({hints.make('train', data, model=model, force=True)}) or pin model.params.revision "
                        "to the commit it was trained with")


def check_fresh(model: str, comp: Competition, test: bool = True) -> None:
    """Refuse a collected model whose inputs changed since it was trained (or predicted).

    The train side (folds, labels, train file) is compared by hash; the config side by
    re-resolving the model's YAML with the overrides it was trained with and comparing that
    to the resolved config saved in ``oof/<data>/<model>.json`` (so a model trained with
    ``ARGS="train.lr=..."`` stays blendable, and an edited YAML is caught, naming the keys).
    Either means retraining. With ``test``, the collected test predictions must be for the
    current test set (:func:`testset_key`); if not, ``make predict`` makes them.

    Raises:
        UserError: naming the model, what changed and the command that fixes it.
    """
    meta_path = paths.oof_meta_file(comp.cfg.name, model)
    if not meta_path.exists():
        raise UserError(f"{meta_path} missing: re-run `{hints.make('collect', comp.cfg.name, model=model)}` (or retrain it)")
    meta = json.loads(meta_path.read_text())
    changed = stale(meta.get("hashes", {}), data_fingerprints(comp))
    if changed:
        raise UserError(f"model '{model}' is stale: {describe(changed)}; retrain it "
                        f"({hints.make('train', comp.cfg.name, model=model, force=True)})")
    check_upstream(meta.get("config", {}).get("source") or comp.cfg.name, model, meta.get("upstream", {}))
    check_weights_fresh(comp.cfg.name, model, meta.get("weights", []))
    drift = config_drift(comp.cfg.name, model, meta.get("config", {}))
    if drift:
        raise UserError(f"model '{model}' is stale: its config changed since it was trained "
                        f"(YAML now + its overrides {meta.get('config', {}).get('overrides', [])}):\n"
                        f"{describe_diff(drift, 'trained', 'now')}\nretrain it "
                        f"({hints.make('train', comp.cfg.name, model=model, force=True)}) or restore the YAML")
    if test:
        check_test_fresh(model, comp)


def collected_test_key(data: str, model: str) -> str | None:
    """The test set (:func:`testset_key`) ``oof/<data>/<model>.test.parquet`` is for."""
    path = paths.test_meta_file(data, model)
    if path.exists():
        return json.loads(path.read_text()).get("test")
    meta = paths.oof_meta_file(data, model)
    return json.loads(meta.read_text()).get("hashes", {}).get("test") if meta.exists() else None


def check_all_fresh(models: Sequence[str], comp: Competition, test: bool = True) -> None:
    """:func:`check_fresh` for every model of a blend at once, so one error names every model
    that needs work (and one ``make predict`` command covers all that need new test files).

    Raises:
        UserError: one line per stale model; or the models whose test files are for another
            test set, with the one command that predicts them all.
    """
    problems = []
    for m in models:
        try:
            check_fresh(m, comp, test=False)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    if test:
        check_tests_fresh(models, comp)


def check_test_fresh(model: str, comp: Competition) -> None:
    """:func:`check_tests_fresh` for one model."""
    check_tests_fresh([model], comp)


def check_tests_fresh(models: Sequence[str], comp: Competition) -> None:
    """Refuse collected test predictions made for another test set than the current one.

    Raises:
        UserError: naming every such model and the one ``make predict`` (no retraining) for all.
    """
    if comp.test is None:
        return
    now = testset_key(comp)
    behind = [m for m in models if collected_test_key(comp.cfg.name, m) != now]
    if behind:
        who = f"model '{behind[0]}'" if len(behind) == 1 else f"models {behind}"
        raise UserError(f"{who}: the test set changed since the test predictions were made "
                        f"({comp.cfg.test_csv}); predict with the saved fold models, no "
                        f"retraining: {hints.make('predict', comp.cfg.name, model=behind)}")


def stale(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """Names of the fingerprints that changed (empty when the artifact is current).

    Artifacts written before the train and test sides were split hold ``data``: the train
    file's hash followed by the test file's. Their train side is read from its head, so an
    upgrade does not turn every trained model into a false "the train file changed"."""
    if "train" in current and "train" not in saved and "data" in saved:
        saved = {**saved, "train": saved["data"][: len(current["train"])]}
    return [k for k in current if saved.get(k) != current[k]]


def describe(changed: list[str]) -> str:
    """Human explanation of what changed."""
    why = {
        "folds": "the folds file was rewritten",
        "labels": "the label vocabulary changed",
        "train": "the train file changed",
    }
    return "; ".join(why[k] for k in changed)
