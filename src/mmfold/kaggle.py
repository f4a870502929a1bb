"""The Kaggle round trip through the official client (PyPI ``kaggle``), and ``mmfold download``.

This is the one module that imports ``kaggle``, and only inside the functions that need it:
the package is an optional extra (``pip install -e '.[kaggle]'``), so every other command runs
without it. What it does with the client's :class:`KaggleApi`:

- ``mmfold download SLUG``: ``competition_download_files`` into a hidden folder beside
  ``input/<slug>/`` (the client resumes a broken download there), unzipped into a second one,
  renamed into place in one step; an existing non-empty ``input/<slug>/`` is never touched.
  Then ``mmfold init`` describes the folder (``data.kaggle`` set to the slug).
- ``submit_file`` / ``wait_for_score``: the logged CSV through ``competition_submit`` (the
  client asks for an upload URL, PUTs the bytes there, then creates the submission), then
  ``get_submission`` until Kaggle has scored it, bounded, with a line per poll
  (:mod:`mmfold.ensemble.submission` records the score).
- ``upload_dataset``: a bundle folder as a private dataset (``dataset_create_new``) or a new
  version of it (``dataset_create_version``), each top-level folder zipped by the client.

Credentials are the client's own: ``~/.kaggle/kaggle.json`` (or ``$KAGGLE_CONFIG_DIR``),
``KAGGLE_USERNAME``/``KAGGLE_KEY``, or ``KAGGLE_API_TOKEN``. Every failure the user can act
on (no client, no credentials, a refused request, a daily limit, a scoring error) is one
:class:`~mmfold.errors.UserError` line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmfold import fileio, hints, paths
from mmfold.config import KAGGLE_SLUG, data_yaml
from mmfold.errors import UserError

PINS = ("kaggle==2.2.5", "six==1.17.0")  # the client imports six without declaring it
INSTALL = f"pip install {' '.join(PINS)} (or: pip install -e '.[kaggle]')"
SETTINGS_URL = "https://www.kaggle.com/settings"
DATASET_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*/[a-z0-9][a-z0-9-]{5,49}")
DATASET_LICENSE = "copyright-authors"  # "Data files (c) Original Authors": the user's own models
WAIT_S = 600.0  # default bound on waiting for a public score
POLL_S = (1.0, 30.0)  # first and longest pause between polls
NOT_YET_S = 60.0  # how long a submission just made may read as unknown (404) before that is an error
MAX_MESSAGE = 500  # characters of a submission's description


# ---- the client ------------------------------------------------------------------------------


def client() -> Any:
    """An authenticated :class:`kaggle.api.kaggle_api_extended.KaggleApi`.

    Importing ``kaggle`` authenticates a module-level instance and prints the client's help
    when there are no credentials; that output is swallowed here and replaced by one line
    saying where to put them.

    Raises:
        UserError: the package is missing, or no credentials are found.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as e:
            absent = (e.name or "").split(".")[0] in ("kaggle", "kagglesdk")
            what = "needs the official client" if absent else f"could not import the client ({e})"
            raise UserError(f"Kaggle commands: {what}: {INSTALL}") from None
    api = KaggleApi()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), calling(api, "signing in to Kaggle"):
            api.authenticate()
    except SystemExit:
        raise UserError(f"no Kaggle credentials: create an API token at {SETTINGS_URL} (API, Create New Token) "
                        f"and save kaggle.json as {_tilde(api.config)} (chmod 600), or set KAGGLE_USERNAME "
                        "and KAGGLE_KEY (or KAGGLE_API_TOKEN)") from None
    if "readable by other users" in out.getvalue():
        print(f"warning: {_tilde(api.config)} is readable by other users: chmod 600 {_tilde(api.config)}",
              file=sys.stderr)
    return api


def _tilde(path: str | Path) -> str:
    """A path under the home folder written with ``~``, as the user would type it."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def _credentials(api: Any) -> str:
    """Where the credentials in use came from, for a message about refused ones."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    return _tilde(api.config) if os.path.exists(api.config) else "your Kaggle credentials"


def _server_message(error: Any) -> str:
    """What Kaggle said about a refused request, on one line."""
    response, text = getattr(error, "response", None), ""
    if response is not None:
        try:
            text = str(response.json().get("message", ""))
        except ValueError:
            text = response.text[:300]
    return " ".join((text or str(error)).split())


@contextlib.contextmanager
def calling(api: Any, what: str, *, competition: str | None = None, dataset: str | None = None) -> Iterator[None]:
    """Turn the client's exceptions into one line that says what failed and what to do.

    Args:
        api: The client (for where its credentials came from).
        what: The action, as the message's subject ("submitting to Kaggle").
        competition: The competition involved (its rules page for a 403, its slug for a 404).
        dataset: The dataset involved (``owner/slug``).
    """
    import requests

    try:
        yield
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        said = _server_message(e)
        if status == 401:
            msg = (f"Kaggle refused the credentials in {_credentials(api)} (HTTP 401: {said}); create a new "
                   f"token at {SETTINGS_URL} and save it there")
        elif status == 403 and competition:
            msg = (f"Kaggle refused access to competition {competition} (HTTP 403: {said}); join it and accept "
                   f"its rules at https://www.kaggle.com/competitions/{competition}/rules")
        elif status == 404 and competition:
            msg = (f"Kaggle has no competition {competition!r} (HTTP 404: {said}); use the slug from its URL, "
                   "https://www.kaggle.com/competitions/<slug>")
        elif status in (403, 404) and dataset:
            msg = f"Kaggle refused dataset {dataset} (HTTP {status}: {said}); is its owner you (or your team)?"
        elif status == 429:
            msg = f"Kaggle is rate limiting this account (HTTP 429: {said}); try again later"
        else:
            msg = f"Kaggle refused it (HTTP {status}: {said})"
        raise UserError(f"{what}: {msg}") from None
    except requests.ConnectionError as e:
        raise UserError(f"{what}: cannot reach Kaggle ({type(e).__name__}); check the network") from None
    except ValueError as e:  # the client's own checks (a bad slug, a missing file)
        raise UserError(f"{what}: {' '.join(str(e).split())}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """The client prints progress and some errors to stdout; keep them for a message instead."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield out


# ---- download --------------------------------------------------------------------------------


def check_slug(slug: str) -> str:
    """A competition slug, or a message saying what one looks like."""
    if not KAGGLE_SLUG.fullmatch(slug):
        raise UserError(f"{slug!r} is not a Kaggle competition slug: give the part of its URL after "
                        "/competitions/ (e.g. titanic)")
    return slug


def check_destination(dest: Path, slug: str) -> None:
    """Refuse a folder that holds files: a download never writes over what is there."""
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{_rel(dest)} exists and is not empty; mmfold download never writes over it: remove it "
                        f"to download again, or describe it: {hints.make('init', slug, DIR=_rel(dest))}")


def download(api: Any, slug: str, dest: Path) -> list[Path]:
    """The competition's files, unzipped, as ``dest`` (a new folder, made whole first).

    The archive goes to ``.<slug>.partial/`` beside ``dest`` and stays there if the transfer
    breaks (the client resumes it on the next run); it is unzipped into ``.<slug>.unzip/``,
    which is renamed to ``dest`` in one step, so ``dest`` never holds half a download.

    Raises:
        UserError: ``dest`` exists with files in it, Kaggle refused, or the archive is bad.
    """
    check_destination(dest, slug)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial, unzip = dest.parent / f".{slug}.partial", dest.parent / f".{slug}.unzip"
    with fileio.file_lock(dest.parent / f".{slug}.download.lock"):
        with calling(api, f"downloading competition {slug}", competition=slug):
            api.competition_download_files(slug, path=str(partial), quiet=False)
        archives = [p for p in partial.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial")]
        if not archives:
            raise UserError(f"Kaggle sent no files for competition {slug}")
        shutil.rmtree(unzip, ignore_errors=True)
        try:
            for archive in archives:
                _unpack(archive, unzip)
            if dest.exists():
                dest.rmdir()  # empty (checked above)
            os.rename(unzip, dest)
        except BaseException:
            shutil.rmtree(unzip, ignore_errors=True)
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _unpack(archive: Path, into: Path) -> None:
    """A zip's members into ``into`` (never outside it); any other file is moved there as is."""
    into.mkdir(parents=True, exist_ok=True)
    if archive.suffix != ".zip":
        shutil.copy2(archive, into / archive.name)
        return
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                target = (into / member).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise UserError(f"{archive.name}: member {member!r} would land outside the folder; not unpacked")
            z.extractall(into)
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)  # a broken archive is not resumed: the next run starts over
        raise UserError(f"{archive.name} from Kaggle is not a valid zip; run the same command again") from None


def _rel(path: Path) -> str:
    """A path as the user types it: relative to the project root where it is inside it."""
    try:
        return str(path.resolve().relative_to(paths.root().resolve()))
    except ValueError:
        return str(path)


def _check_new_yaml(name: str, slug: str) -> None:
    """Refuse a data config name that exists (init never overwrites one), before downloading."""
    if data_yaml(name).exists():
        raise UserError(f"{_rel(data_yaml(name))} exists and init never overwrites a data config; nothing was "
                        f"downloaded: name the new one (make download COMP={slug} ARGS='--name <name>')")


def run_init(folder: Path, name: str, slug: str) -> Path | None:
    """``mmfold init`` on a downloaded folder, with ``data.kaggle=<slug>`` written into the YAML.

    Returns the data YAML, or None when this version has no ``mmfold init`` (a note says what
    to write by hand).

    Raises:
        UserError: init stopped (an ambiguity, an existing YAML), saying the files are in place.
    """
    try:
        from mmfold.data import init
    except ImportError:
        if importlib.util.find_spec("mmfold.data.init") is not None:
            raise  # it is there but broke: show why
        print(f"note: this mmfold has no `mmfold init`: describe {_rel(folder)} in configs/data/{name}.yaml "
              f"by hand, with `kaggle: {slug}` under data:")
        return None
    p = argparse.ArgumentParser(prog="mmfold init")  # as the CLI builds it (common arguments first)
    p.add_argument("--data", default="demo")
    p.add_argument("--force", action="store_true")
    p.add_argument("overrides", nargs="*")
    init.add_arguments(p)
    args = p.parse_intermixed_args([str(folder.absolute()), f"data.kaggle={slug}", "--name", name])
    try:
        init.run(args)
    except UserError as e:
        raise UserError(f"the files are in {_rel(folder)}, but init stopped: {e}") from None
    return data_yaml(name)


# ---- submissions -----------------------------------------------------------------------------


def submissions_left(api: Any, slug: str) -> int | None:
    """How many submissions Kaggle allows now, or None where it does not say (an older
    server; a user not yet on a team gets zeros, which say nothing)."""
    import requests

    try:
        with _quiet():
            limits = api.competition_get_submission_limits(slug)
    except requests.HTTPError as e:
        if e.response is not None and (e.response.status_code == 404 or e.response.status_code >= 500):
            return None
        with calling(api, f"asking Kaggle for the submission limits of {slug}", competition=slug):
            raise
    if not limits.num_today and not limits.num_allowed_now:
        return None
    return int(limits.num_allowed_now)


def submit_file(api: Any, slug: str, csv: Path, message: str) -> int:
    """Upload ``csv`` as a submission to ``slug``; its Kaggle id.

    Refused before any upload when Kaggle says no submission is left today.

    Raises:
        UserError: the daily limit, refused credentials or competition, a failed upload.
    """
    left = submissions_left(api, slug)
    if left is not None and left <= 0:
        raise UserError(f"no Kaggle submissions left today for {slug}; nothing was submitted: "
                        "try again after the daily reset (00:00 UTC)")
    with _quiet() as out, calling(api, f"submitting {csv.name} to {slug}", competition=slug):
        response = api.competition_submit(str(csv), message[:MAX_MESSAGE], slug, quiet=True)
    if not getattr(response, "ref", 0):
        said = " ".join(f"{response.message or ''} {out.getvalue()}".split()) or "no submission id came back"
        raise UserError(f"submitting {csv.name} to {slug}: Kaggle did not take it: {said}")
    return int(response.ref)


def find_submission(api: Any, slug: str, prefix: str) -> Any | None:
    """The newest of this account's submissions to ``slug`` whose description starts with
    ``prefix`` (one made before a wait was cut short), or None."""
    with _quiet(), calling(api, f"listing your submissions to {slug}", competition=slug):
        found = api.competition_submissions(slug) or []
    return next((s for s in found if s is not None and (s.description or "").startswith(prefix)), None)


def wait_for_score(api: Any, ref: int, wait_s: float = WAIT_S, label: str = "", resubmit: str = "") -> float:
    """Poll submission ``ref`` until Kaggle has scored it; its public score.

    Pauses grow from ``POLL_S[0]`` to ``POLL_S[1]`` seconds; each poll prints one line.

    Raises:
        UserError: Kaggle could not score it (a format error: its own words), it has no public
            score, or ``wait_s`` passed first.
    """
    from kagglesdk.competitions.types.submission_status import SubmissionStatus

    started, pause = time.monotonic(), POLL_S[0]
    what = f"submission {ref}" + (f" ({label})" if label else "")
    while True:
        sub = _read_submission(api, ref, what, time.monotonic() - started < NOT_YET_S)
        elapsed = time.monotonic() - started
        if sub is not None and sub.status == SubmissionStatus.ERROR:
            said = " ".join((sub.error_description or "no reason given").split())
            again = f" (once it is fixed, to send it again: {resubmit})" if resubmit else ""
            raise UserError(f"Kaggle could not score {what}: {said}{again}")
        if sub is not None and sub.status == SubmissionStatus.COMPLETE:
            return _public_score(sub, what)
        state = sub.status.name.lower() if sub is not None else "not visible yet"
        print(f"  {what}: {state} after {elapsed:.0f}s (waiting up to {wait_s:.0f}s)", flush=True)
        if elapsed + pause > wait_s:
            raise UserError(f"no public score for {what} after {elapsed:.0f}s; it is submitted: run the same "
                            "command again to wait for it (it is not submitted twice)")
        time.sleep(pause)
        pause = min(pause * 1.5, POLL_S[1])


def _read_submission(api: Any, ref: int, what: str, may_lag: bool) -> Any | None:
    """Submission ``ref`` as Kaggle shows it now; None for a 404 while ``may_lag`` (Kaggle's
    reads lag its writes: a submission just made can be unknown for a few seconds, and the
    client's own poller counts that as pending too)."""
    import requests

    try:
        with _quiet():
            return api.get_submission(ref)
    except requests.HTTPError as e:
        if may_lag and e.response is not None and e.response.status_code == 404:
            return None
        with calling(api, f"reading {what} back"):
            raise


def _public_score(sub: Any, what: str) -> float:
    """A scored submission's public score as a number."""
    text = (sub.public_score or "").strip()
    try:
        return float(text)
    except ValueError:
        raise UserError(f"Kaggle scored {what} but shows no public score ({text or 'none'}); the competition "
                        "may hide it until the end") from None


# ---- datasets --------------------------------------------------------------------------------


def check_dataset(ref: str) -> str:
    """``owner/slug`` as Kaggle takes it, or a message saying what it should be."""
    if not DATASET_SLUG.fullmatch(ref):
        raise UserError(f"--kaggle-dataset {ref!r}: give owner/slug, the slug 6 to 50 characters of lower-case "
                        "letters, digits and hyphens (e.g. alice/mmfold-blend)")
    return ref


def dataset_exists(api: Any, ref: str) -> bool:
    """Whether ``owner/slug`` is already a dataset (a 404 says it is not)."""
    import requests

    try:
        with _quiet():
            api.dataset_status(ref)
    except requests.HTTPError as e:
        if e.response is not None and e.response.status_code == 404:
            return False
        with calling(api, f"looking up dataset {ref}", dataset=ref):
            raise
    return True


def upload_dataset(api: Any, ref: str, folder: Path, title: str, notes: str) -> tuple[str, bool]:
    """``folder`` as a new private dataset ``ref``, or as a new version of it.

    The client wants ``dataset-metadata.json`` inside the folder it uploads; the bundle is
    never modified, so a hidden staging folder beside it holds that file and a link to each
    top-level entry (folders are zipped by the client, and Kaggle unpacks them).

    Returns:
        The dataset's URL and whether it was created (else versioned).
    """
    check_dataset(ref)
    stage = folder.parent / f".{folder.name}.kaggle"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for entry in sorted(folder.iterdir()):
            (stage / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        title = title if len(title) >= 6 else f"{title} bundle"
        fileio.write_json(stage / "dataset-metadata.json",
                          {"id": ref, "title": title[:50], "licenses": [{"name": DATASET_LICENSE}]})
        created = not dataset_exists(api, ref)
        with calling(api, f"uploading {_rel(folder)} to dataset {ref}", dataset=ref):
            if created:
                response = api.dataset_create_new(str(stage), public=False, quiet=False, dir_mode="zip")
            else:
                response = api.dataset_create_version(str(stage), notes, quiet=False, dir_mode="zip")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if getattr(response, "error", None):
        raise UserError(f"uploading {_rel(folder)} to dataset {ref}: Kaggle said: {response.error}")
    return response.url or f"https://www.kaggle.com/datasets/{ref}", created


# ---- mmfold download -------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mmfold download SLUG [--name NAME]``."""
    p.add_argument("slug", help="the competition's slug (its URL: https://www.kaggle.com/competitions/<slug>)")
    p.add_argument("--name", help="the data config to write (configs/data/<name>.yaml; default: the slug)")


def run(args: argparse.Namespace) -> int:
    """Download into ``input/<slug>/``, then describe it with ``mmfold init``."""
    slug = check_slug(args.slug)
    dest = paths.root() / "input" / slug
    check_destination(dest, slug)  # before asking for credentials
    name = args.name or slug
    _check_new_yaml(name, slug)  # before a download that init could only refuse afterwards
    api = client()
    started = time.perf_counter()
    files = download(api, slug, dest)
    size = sum(f.stat().st_size for f in files)
    print(f"downloaded competition {slug}: {len(files)} files, {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - started:.0f}s, into {_rel(dest)}/")
    run_init(dest, name, slug)
    return 0
