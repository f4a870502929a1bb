"""Typed configuration: one dataclass per concern, YAML files, dotted CLI overrides.

Resolution order (later wins): dataclass defaults -> ``configs/data/<data>.yaml`` ->
``configs/models/<model>.yaml`` -> ``key.sub=value`` overrides from the command line.
Every YAML file holds top-level sections named like the fields of :class:`Config`
(``data:``, ``folds:``, ``model:``, ``train:``, ``blend:``). Unknown keys are errors that list
the valid ones, because a typo that is silently ignored wastes a GPU night.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mmfold import fileio, owners, paths
from mmfold.errors import UserError
from mmfold.metrics import CHECKPOINT_SCORES, OPTIMISED


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


@dataclass
class DataConfig:
    """Where a competition's files are and how to read them."""

    name: str = "demo"
    root: str = "input/demo"
    train_csv: str = "train.csv"
    test_csv: str | None = "test.csv"
    sample_submission: str | None = None  # its header (and id order check) shapes the submission
    id_col: str = "ImageID"
    label_col: str = "Labels"
    caption_col: str | None = "Caption"
    label_sep: str = " "
    encoding: str = "utf-8"
    image_dir: str | None = "images"
    image_ext: str = ""
    allow_empty_labels: bool = False
    check_images: bool = True
    # drop train rows whose image is missing, empty or undecodable (warned, listed); a bad
    # test image stays an error since every test id must be submitted
    drop_bad_images: bool = False
    models: list[str] = field(default_factory=list)
    metric: str = "samples"  # the competition metric: drives early stopping, CV lines, blend, sweeps
    kaggle: str | None = None  # the Kaggle competition's slug: `submit --kaggle` submits there (mmfold.kaggle)


@dataclass
class FoldsConfig:
    """How train ids are split into folds."""

    n_splits: int = 5
    seed: int = 42
    group_col: str | None = None


@dataclass
class ModelConfig:
    """A registered model kind and its options (``params`` is passed to the builder)."""

    name: str = ""
    kind: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation and training-loop settings shared by all torch models."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    loss: str = "bce"
    loss_params: dict[str, Any] = field(default_factory=dict)
    pos_weight: bool = False
    amp: str = "auto"
    accum_steps: int = 1
    grad_clip: float = 1.0
    ema: float = 0.0
    patience: int = 0
    select_threshold: str = "half"  # best checkpoint / early stopping by data.metric at 0.5 ("half") or at the best single threshold ("global")
    freeze_backbone_epochs: int = 0
    tta: bool = False
    augment: list[dict[str, Any]] = field(default_factory=list)
    image_size: int | None = None
    max_len: int = 64
    length_buckets: int = 0  # >0: training batches of similar caption length, sorted in pools of this many batches; 0 = plain shuffle
    num_workers: int = 0
    channels_last: bool = False
    device: str = "auto"
    # what one fold (one seed) asks a Ray cluster for under `train --ray`: num_cpus, num_gpus,
    # memory (bytes); CPU members ask for CPUs only (mmfold.train.ray_runner)
    resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    seed: int = 42
    seeds: list[int] = field(default_factory=list)  # >1 seed: each fold trained per seed, averaged (mmfold.train.seeds)
    deterministic: bool = True
    progress: bool = True
    stop_after_epochs: int = 0  # stop (as if interrupted) after this many epochs of a session; 0 = never
    threads: int = 0  # torch CPU threads; 0 = torch's default (1 is far faster for tiny models on a busy CPU)
    trackers: list[str] = field(default_factory=list)  # experiment tracking: tensorboard, mlflow, wandb (mmfold.train.trackers)


@dataclass
class BlendConfig:
    """How model OOF probabilities are combined and thresholded."""

    method: str = "optuna"
    n_trials: int = 100
    transform: str = "none"
    min_labels: int = 1
    max_labels: int | None = None
    top_k: int | None = None
    # how probabilities become label sets: ``thresholds`` (per label), ``expected_f1`` (per
    # row, after a per-label ``calibration``: platt, isotonic or none) or ``gfm`` (expected F1
    # with the label count learned); mmfold.ensemble.decoders
    decoder: str = "thresholds"
    calibration: str = "platt"
    cooccurrence: bool = False
    seed: int = 42
    models: list[str] = field(default_factory=list)


@dataclass
class LeversConfig:
    """The models ``mmfold levers`` adds to (or swaps into) the plain blend, per lever; the
    decoder and stacker levers need none (mmfold.studies.levers)."""

    knn: list[str] = field(default_factory=list)  # nearest-neighbour label-transfer members, added
    seeds: dict[str, str] = field(default_factory=dict)  # model -> its multi-seed version, swapped in
    students: list[str] = field(default_factory=list)  # distilled / pseudo-labelled students, added
    ids: list[str] = field(default_factory=list)  # members reading only the row id (id_knn), added
    n_trials: int | None = None  # blend.n_trials for every lever's blend (None: blend.n_trials)
    decoder: str = "expected_f1"  # how the "all" lever decides (expected_f1 or gfm)
    method: str | None = None  # blend.method of the "ids" and "all" levers (None: optuna, the plain blend's)


@dataclass
class Config:
    """The resolved configuration of one command."""

    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    levers: LeversConfig = field(default_factory=LeversConfig)
    # the ``key=value`` overrides this config was resolved with: provenance, not a setting, so
    # a run's freshness can be re-checked later as "the YAML now + the same overrides"
    overrides: list[str] = field(default_factory=list)
    source: str = ""  # the --data argument it came from: a name, or a YAML file's path

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe)."""
        return asdict(self)


# Settings that only change how long a run goes, not what it learns per step. A resumed run
# may change these; anything else differing from the checkpoint's config is refused.
# ``train.epochs`` is not one of them: the cosine schedule's length is the epoch count, so
# changing it mid-run would make the learning rate jump (start over with FORCE=1 instead).
# How a run executes, never what it computes.
EXECUTION_KEYS = ("train.num_workers", "train.progress", "train.device", "train.threads", "train.trackers", "train.resources")
RUN_LENGTH_KEYS = frozenset({"train.patience", "train.stop_after_epochs", *EXECUTION_KEYS})

# Key prefixes that cannot change what a fold learns: which models a data config lists, the
# image check, blending, a model's sweep/ablation declarations, its name, the override record,
# how the run executes. The one definition every stage uses (resume, freshness, sweeps).
NOT_LEARNING = ("data.models", "data.check_images", "data.sample_submission", "data.kaggle", "blend.",
                "model.name", "model.search_space", "model.ablations", "overrides", "source",
                *EXECUTION_KEYS)


def learned_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened data/model/train settings that change what a fold learns, run length
    (epochs, patience) included: two runs with equal settings compute the same thing, so a
    sweep or ablation may reuse a finished fold."""
    config = with_defaults(config)
    flat = flatten({k: config.get(k, {}) for k in ("data", "model", "train")})
    return {k: v for k, v in flat.items() if not k.startswith(NOT_LEARNING)}


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with every field a later version added filled with its default.

    A run saved before a setting existed was trained as if it had the default: comparing
    the raw dicts would call every older run stale (``None -> 0``) the day a field is added.
    """
    return config_from_dict(config).to_dict()


def learning_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Differences between two config dicts that change what a fold learns.

    The one definition used by resume (the checkpoint's config against the current one) and by
    freshness (a model's saved config against what it claims to be now).
    """
    return {k: v for k, v in diff(a, b, ignore=RUN_LENGTH_KEYS).items() if not k.startswith(NOT_LEARNING)}


def describe_diff(changed: dict[str, tuple[Any, Any]], before: str, after: str) -> str:
    """``  key: <before> a -> <after> b`` lines for an error message."""
    return "\n".join(f"  {k}: {before} {a!r} -> {after} {b!r}" for k, (a, b) in changed.items())


# Keys that moved: an old name is refused with a pointer to the new one.
MOVED_KEYS = {"blend.metric": "data.metric"}


def configs_dir() -> Path:
    """``configs/`` under the project root."""
    return paths.root() / "configs"


def data_yaml(data: str) -> Path:
    """``configs/data/<data>.yaml``, or ``data`` itself when it names a YAML file (a data
    config kept outside the repo's configs/)."""
    if paths.is_yaml_file(data):
        return Path(data)
    return configs_dir() / "data" / f"{data}.yaml"


def model_dirs(data: str = "") -> list[Path]:
    """Where a model name is looked up: ``configs/models/``, then, for a data YAML given by path,
    its folder's ``models/`` and the folder itself, so a competition's own model YAMLs live (and
    travel) beside it and every stage finds them by name."""
    dirs = [configs_dir() / "models"]
    if paths.is_yaml_file(data):
        here = Path(data).expanduser().parent
        dirs += [d for d in (here / "models", here) if d.resolve() != (configs_dir() / "data").resolve()]
    return dirs


def model_yaml(model: str, data: str = "") -> Path:
    """The YAML of model ``model`` (a name, or a YAML path) for the data config ``data``.

    Raises:
        ConfigError: the name is defined in two of :func:`model_dirs` (which would be a guess).
    """
    if paths.is_yaml_file(model):
        return Path(model).expanduser()
    skip = Path(data).expanduser().resolve() if paths.is_yaml_file(data) else None
    found = list(dict.fromkeys(p.resolve() for d in model_dirs(data) if (p := d / f"{model}.yaml").is_file()))
    found = [p for p in found if p != skip]
    if len(found) > 1:
        raise ConfigError(f"model '{model}' is defined twice: {found[0]} and {found[1]}; rename one "
                          "(a model is found by its name)")
    return found[0] if found else configs_dir() / "models" / f"{model}.yaml"


def model_key(model: str, data: str = "") -> str:
    """The name a model's artifacts are keyed by: ``model`` itself, or a YAML path's stem.

    A path must be found again by its name (in :func:`model_dirs`), since collect, blend,
    predict and freshness look a model up by name long after ``MODEL=`` was typed.

    Raises:
        ConfigError: no such file, or one that its name does not find.
    """
    if not paths.is_yaml_file(model):
        return model
    path = Path(model).expanduser()
    if not path.is_file():
        raise ConfigError(f"no model config {path}")
    if model_yaml(path.stem, data).resolve() != path.resolve():
        where = ", ".join(f"{d}/" for d in model_dirs(data))
        raise ConfigError(f"model config {path}: keep it where its name '{path.stem}' finds it ({where}): "
                          f"every later stage looks model '{path.stem}' up by name")
    return path.stem


def list_models(data: str = "") -> list[str]:
    """Names of every model YAML in :func:`model_dirs` (beside a data YAML: those with a
    ``model:`` section)."""
    names = {p.stem for p in (configs_dir() / "models").glob("*.yaml")}
    for d in model_dirs(data)[1:]:
        names |= {p.stem for p in d.glob("*.yaml") if _is_model_yaml(p)}
    return sorted(names)


def _is_model_yaml(path: Path) -> bool:
    """Whether a YAML file has a ``model:`` section (a model config, not a data config)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("model"), dict)


def load_config(data: str = "demo", model: str | None = None, overrides: list[str] = ()) -> Config:
    """Resolve defaults, the data YAML, the model YAML and overrides into a :class:`Config`.

    Args:
        data: Data config name (``configs/data/<data>.yaml``) or a data YAML's path; it need
            not exist for ``demo``.
        model: Model config name or YAML path (:func:`model_key`), or None for commands that
            train nothing.
        overrides: ``key.sub=value`` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: missing file, unknown key, a value of the wrong type, or a data key that
            another data YAML's artifacts hold (:func:`mmfold.owners.check_owner`).
    """
    cfg = Config()
    path = data_yaml(data)
    if path.exists():
        merge(cfg, _read_yaml(path), str(path))
    elif data != "demo":
        raise ConfigError(f"no data config {path}; available: {_names(configs_dir() / 'data')}")
    _set_data_name(cfg, data, path)
    if model:
        name = model_key(model, data)
        mpath = model_yaml(name, data)
        if not mpath.exists():
            raise ConfigError(f"no model config {mpath}; available: {list_models(data)}")
        merge(cfg, _read_yaml(mpath), str(mpath))
        cfg.model.name = name
    apply_overrides(cfg, overrides)
    cfg.overrides, cfg.source = list(overrides), data
    validate(cfg)
    owners.check_owner(cfg.data.name, path)
    return cfg


def _set_data_name(cfg: Config, data: str, path: Path) -> None:
    """The artifact key (:func:`mmfold.paths.data_name`); a config under ``configs/data/`` is
    keyed by its file name, so a ``data.name`` there must agree."""
    key = paths.data_name(data)
    if not paths.is_yaml_file(data) and cfg.data.name not in (key, DataConfig.name):
        raise ConfigError(f"{path}: data.name {cfg.data.name!r} differs from the file's name {key!r}; a config "
                          "in configs/data/ is keyed by its file name (drop data.name, or rename the file)")
    cfg.data.name = key


def validate(cfg: Config) -> None:
    """Checks that need the whole config; run when it loads, before any work starts.

    Raises:
        ConfigError: an unknown metric or checkpoint score (listing the known ones).
    """
    if cfg.data.metric not in OPTIMISED:
        raise ConfigError(f"data.metric: unknown metric {cfg.data.metric!r}; known: {list(OPTIMISED)}")
    if cfg.data.kaggle is not None and not KAGGLE_SLUG.fullmatch(cfg.data.kaggle):
        raise ConfigError(f"data.kaggle: {cfg.data.kaggle!r} is not a competition slug; give the part of the "
                          "competition's URL after /competitions/ (e.g. kaggle: titanic)")
    if cfg.train.select_threshold not in CHECKPOINT_SCORES:
        raise ConfigError(f"train.select_threshold: {cfg.train.select_threshold!r} unknown; "
                          f"known: {list(CHECKPOINT_SCORES)}")
    if cfg.blend.decoder in SAMPLES_ONLY_DECODERS and cfg.data.metric != "samples":
        raise ConfigError(f"blend.decoder={cfg.blend.decoder} maximises samples-F1, but data.metric is "
                          f"{cfg.data.metric}: add blend.decoder=thresholds")


# a Kaggle competition's slug, as in https://www.kaggle.com/competitions/<slug>
KAGGLE_SLUG = re.compile(r"[a-z0-9][a-z0-9-]*")

# decoders that maximise the expected samples-F1 of each row (mmfold.ensemble.decoders)
SAMPLES_ONLY_DECODERS = ("expected_f1", "gfm")


def test_override(test: str | None, data: str = "demo", overrides: list[str] = ()) -> list[str]:
    """``--test PATH`` as a ``data.test_csv`` override (absolute: a path typed on the command
    line is not relative to the data root), with the sample submission beside it.

    A stage-2 test set comes with its own sample submission: the first one lists other ids.
    When the data config names a sample submission (``data.sample_submission``) and the
    overrides do not, the one beside the new test file (:func:`sample_beside`) replaces it.
    """
    if not test:
        return []
    path = Path(test).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"--test {test}: no such file")
    out = [f"data.test_csv={path}"]
    if any(override_key(o) == "data.sample_submission" for o in overrides):
        return out
    if load_config(data, None, list(overrides)).data.sample_submission:
        sample = sample_beside(path)
        if sample is not None:
            print(f"note: the sample submission for {path.name} is {sample} (the one beside it)")
            out.append(f"data.sample_submission={sample}")
    return out


def sample_beside(test: Path) -> Path | None:
    """The CSV beside a test file whose name says it is a sample submission, if there is one.

    Raises:
        ConfigError: several candidates, naming them and the setting that picks one.
    """
    found = sorted(p for p in test.parent.glob("*.csv") if p != test and "sample" in p.name.lower())
    if len(found) > 1:
        raise ConfigError(f"several sample submissions beside {test}: {[p.name for p in found]}; pick one: "
                          f"ARGS='data.sample_submission={found[0]}'")
    return found[0] if found else None


def model_names(cfg: Config, requested: str | None) -> list[str]:
    """Models to train: ``--model a,b`` or the data config's list, each once (a model named
    twice would have its folds trained twice at once)."""
    names = requested.split(",") if requested else cfg.data.models
    if not names:
        raise ConfigError(f"no models: pass MODEL=... or list data.models; available: {list_models(cfg.source)}")
    return list(dict.fromkeys(model_key(n.strip(), cfg.source) for n in names))


def _names(folder: Path) -> list[str]:
    """YAML stems in a folder, for error messages."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with the file name in any error."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
    for key in ("overrides", "source"):
        if key in doc:
            raise ConfigError(f"{path}: '{key}' is recorded by mmfold, not set in a YAML file")
    return doc


def merge(obj: Any, values: dict[str, Any], where: str, prefix: str = "") -> None:
    """Recursively set dataclass fields from a nested dict, rejecting unknown keys."""
    valid = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            hint = f" ('{dotted}' is now '{MOVED_KEYS[dotted]}')" if dotted in MOVED_KEYS else ""
            raise ConfigError(f"{where}: unknown key '{dotted}'{hint}; valid keys: {sorted(valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' must be a mapping")
            merge(current, value, where, dotted + ".")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, _deep_merge(current, value))
        else:
            setattr(obj, key, _coerce(value, obj, valid[key], dotted, where))


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into a copy of ``base``, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _coerce(value: Any, obj: Any, f: dataclasses.Field, dotted: str, where: str) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted for floats."""
    hint = typing.get_type_hints(type(obj))[f.name]
    allowed = _allowed_types(hint)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
        names = "/".join(t.__name__ for t in allowed)
        raise ConfigError(f"{where}: '{dotted}' must be {names}, got {value!r}")
    return copy.deepcopy(value)


def _allowed_types(hint: Any) -> tuple[type, ...]:
    """Runtime types accepted by an annotation like ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _allowed_types(a))
    if origin is not None:
        return (origin,)
    if hint is Any:
        return (object,)
    return (hint,)


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply ``section.key=value`` overrides (``model.params.x=1`` reaches into dicts)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value; a value with "
                              "spaces needs quotes inside ARGS: ARGS='data.root=\"/my data\"'")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        merge(cfg, _nest(key.strip().split("."), value), "override")


def override_key(item: str) -> str:
    """The dotted key of a ``key.sub=value`` override (``train.lr=1e-3`` -> ``train.lr``)."""
    return item.split("=", 1)[0].strip()


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    """``['a','b','c'], v`` -> ``{'a': {'b': {'c': v}}}`` for dataclass levels.

    Dict-typed fields (``model.params``) take the rest of the path as nested keys and are
    merged, not replaced.
    """
    if len(keys) == 1:
        return {keys[0]: value}
    return {keys[0]: _nest(keys[1:], value)}


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    return fileio.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a checkpoint)."""
    cfg = Config()
    d = copy.deepcopy(d)
    if "metric" in d.get("blend", {}):  # saved before the metric became one data-level setting
        d.setdefault("data", {})["metric"] = d["blend"].pop("metric")
    merge(cfg, d, "saved config")
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{'a.b.c': value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(a: dict[str, Any], b: dict[str, Any], ignore: frozenset[str] = frozenset()) -> dict:
    """Keys whose values differ between two nested dicts: ``{key: (a_value, b_value)}``."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted((set(fa) | set(fb)) - set(ignore))
    return {k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)}


def stable_hash(obj: Any) -> str:
    """Short sha256 of a JSON-serialisable object, stable across runs."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
