"""The Kaggle round trip (``mmfold download``, ``submit --kaggle``, ``export --kaggle-dataset``),
offline: the real ``kaggle`` client, run as the user runs it (``python -m mmfold ...``), talks
to a stand-in for Kaggle's API on ``127.0.0.1`` (``tests/kaggleserver.py``).

The client's endpoint cannot be set to an arbitrary URL: its own switch
``KAGGLE_API_ENVIRONMENT=LOCALHOST`` points it at ``http://localhost``, and the standard
``http_proxy`` variable sends that traffic to the stand-in's free port. Each test asserts what
results: the files on disk, the rows of ``lb.csv`` and the log, the bytes the server received,
and for every refusal one line on stderr with nothing changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmfold.config import ConfigError, learning_diff, load_config
from mmfold.ensemble import submission as submit
from mmfold.errors import UserError
from tests.conftest import write_competition
from tests.kaggleserver import Competition, Kaggle, KaggleServer, Submission

SLUG = "tiny-comp"
CSV = "ImageID,Labels\n40.jpg,1 2\n41.jpg,3\n"
Run = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def kaggle_home(tmp_path: Path) -> Path:
    """A home folder whose ``~/.kaggle/kaggle.json`` holds the stand-in's user."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    creds = home / ".kaggle" / "kaggle.json"
    creds.write_text(json.dumps({"username": "alice", "key": "secret-key"}))
    creds.chmod(0o600)
    return home


@pytest.fixture
def server() -> Iterator[tuple[Kaggle, str]]:
    """The stand-in, with one competition whose scorer wants ``ImageID,Labels``."""
    state = Kaggle(competitions={SLUG: Competition(files={"train.csv": b"x"})})
    with KaggleServer(state) as proxy:
        yield state, proxy


@pytest.fixture
def mmfold(project: Path, kaggle_home: Path, server: tuple[Kaggle, str]) -> Run:
    """``mmfold ...`` in a fresh process, as a user runs it, reaching only the stand-in."""
    _, proxy = server
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KAGGLE_") and "proxy" not in k.lower() and k not in ("XDG_CONFIG_HOME", "MMFOLD_DATA_ARG")}
    env |= {"HOME": str(kaggle_home), "MMFOLD_HOME": str(project), "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "http_proxy": proxy, "HTTP_PROXY": proxy}

    def run(*args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mmfold", *args], cwd=cwd or project,
                              env=env | (extra_env or {}), capture_output=True, text=True, timeout=120, check=False)

    return run


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with one ``error:`` line on stderr holding ``words``, no traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0], r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---- download --------------------------------------------------------------------------------


def competition_files(tmp_path: Path) -> dict[str, bytes]:
    """A small real-looking competition (CSVs and images) as the bytes Kaggle would serve."""
    src = write_competition(tmp_path / "src", name="served")
    return {str(p.relative_to(src)): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}


def test_download_unzips_the_competition_into_input_and_describes_it(
        mmfold: Run, server: tuple[Kaggle, str], project: Path, tmp_path: Path) -> None:
    state, _ = server
    files = competition_files(tmp_path)
    state.competitions[SLUG].files = files
    elsewhere = tmp_path / "elsewhere"  # MMFOLD_HOME names the project; the shell is somewhere else
    elsewhere.mkdir()
    r = mmfold("download", SLUG, cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    dest = project / "input" / SLUG
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files  # every file, unzipped in place, byte for byte
    assert sorted(p.name for p in (project / "input").iterdir()) == [".tiny-comp.download.lock", SLUG]
    assert [(m, p) for m, p, _ in state.requests] == [
        ("POST", "/api/v1/competitions.CompetitionApiService/DownloadDataFiles"), ("GET", f"/files/{SLUG}.zip")]
    assert f"downloaded competition {SLUG}: {len(files)} files" in r.stdout
    if importlib.util.find_spec("mmfold.data.init") is not None:  # init describes it, naming the competition
        doc = yaml.safe_load((project / "configs" / "data" / f"{SLUG}.yaml").read_text())
        assert doc["data"]["kaggle"] == SLUG
        assert load_config(SLUG).data.kaggle == SLUG


def test_download_never_writes_over_a_folder_that_has_files(mmfold: Run, server: tuple[Kaggle, str],
                                                            project: Path) -> None:
    state, _ = server
    mine = project / "input" / SLUG / "train.csv"
    mine.parent.mkdir(parents=True)
    mine.write_text("my edits")
    one_line_error(mmfold("download", SLUG), f"input/{SLUG} exists and is not empty", "make init")
    assert mine.read_text() == "my edits" and state.requests == []  # refused before any request


def test_download_under_a_data_name_that_exists_is_refused_before_any_request(
        mmfold: Run, server: tuple[Kaggle, str], project: Path) -> None:
    state, _ = server
    mine = project / "configs" / "data" / f"{SLUG}.yaml"
    mine.write_text("data: {name: mine}\n")
    one_line_error(mmfold("download", SLUG), f"configs/data/{SLUG}.yaml exists", "nothing was downloaded",
                   f"make download COMP={SLUG} ARGS='--name <name>'")
    assert state.requests == [] and not (project / "input" / SLUG).exists()
    assert mine.read_text() == "data: {name: mine}\n"


def test_download_of_a_competition_whose_rules_are_not_accepted_says_where_to_accept(
        mmfold: Run, server: tuple[Kaggle, str], project: Path) -> None:
    state, _ = server
    state.competitions[SLUG].rules_accepted = False
    one_line_error(mmfold("download", SLUG), "HTTP 403", f"https://www.kaggle.com/competitions/{SLUG}/rules")
    assert not (project / "input" / SLUG).exists()
    one_line_error(mmfold("download", "no-such-comp"), "no competition 'no-such-comp'", "HTTP 404")
    one_line_error(mmfold("download", "https://www.kaggle.com/competitions/x"), "not a Kaggle competition slug")


def test_missing_or_refused_credentials_are_one_line_saying_where_they_go(
        mmfold: Run, kaggle_home: Path, project: Path) -> None:
    creds = kaggle_home / ".kaggle" / "kaggle.json"
    creds.write_text(json.dumps({"username": "alice", "key": "wrong"}))
    one_line_error(mmfold("download", SLUG), "refused the credentials in ~/.kaggle/kaggle.json", "HTTP 401")
    creds.unlink()
    r = mmfold("download", SLUG)
    one_line_error(r, "no Kaggle credentials", "~/.kaggle/kaggle.json", "KAGGLE_USERNAME")
    assert "Authentication required" not in r.stdout  # the client's own help is not dumped too
    r = mmfold("download", SLUG, extra_env={"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "secret-key"})
    assert (project / "input" / SLUG / "train.csv").read_bytes() == b"x"  # the environment's credentials work
    if importlib.util.find_spec("mmfold.data.init") is not None:  # a folder init cannot read: said, files kept
        assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(
            f"mmfold download: error: the files are in input/{SLUG}, but init stopped: "), r.stderr


class NotInstalled(importlib.abc.MetaPathFinder):
    """Imports of a package fail as they do where it is not installed."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def test_without_the_package_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmfold import kaggle

    for name in [m for m in sys.modules if m.split(".")[0] in ("kaggle", "kagglesdk", "six")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled("kaggle"), *sys.meta_path])
    with pytest.raises(UserError, match=r"needs the official client: pip install kaggle==2\.2\.5 six==1\.17\.0"):
        kaggle.client()
    monkeypatch.setattr(sys, "meta_path", [NotInstalled("six"), *sys.meta_path[1:]])  # the undeclared dependency
    with pytest.raises(UserError, match=r"could not import the client \(No module named 'six'\): pip install"):
        kaggle.client()


# ---- submit --kaggle -------------------------------------------------------------------------


@pytest.fixture
def logged(project: Path) -> Path:
    """Data config ``d`` naming the competition, and a logged submission ``s0`` with its CSV."""
    (project / "configs" / "data" / "d.yaml").write_text(yaml.safe_dump({"data": {"kaggle": SLUG}}))
    submit.append_log("d", {"name": "s0", "time": "t", "models": "tfidf effnet", "method": "optuna",
                            "metric": "samples", "weights": {"tfidf": 0.6, "effnet": 0.4},
                            "cv_mean": "0.800000", "cv_std": "0.010000", "cv_in_sample": "0.81", "commit": "abc123"})
    csv = submit.submission_path("d", "s0")
    csv.write_text(CSV)
    return csv


def test_submit_kaggle_uploads_the_logged_csv_and_records_the_public_score(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path) -> None:
    state, _ = server
    r = mmfold("submit", "--data", "d", "--name", "s0", "--kaggle")
    assert r.returncode == 0, r.stderr
    (sub,) = state.submissions
    assert sub.data == logged.read_bytes()  # the upload request carried the logged CSV's bytes
    (start,) = state.calls("StartSubmissionUpload")
    assert start["contentLength"] == len(CSV) and start["fileName"] == "s0.csv"
    assert sub.description == ("mmfold d/s0: honest CV 0.8000 ± 0.0100 (samples-F1); 2 members by optuna: "
                               "tfidf 0.60, effnet 0.40; commit abc123")
    lb = submit.read_lb("d")
    assert lb[["name", "lb", "source", "ref"]].values.tolist() == [["s0", "0.81234", "kaggle", str(sub.ref)]]
    assert submit.read_log("d")["lb"].tolist() == ["0.81234"]
    assert "pending after" in r.stdout and f"recorded LB 0.81234 for s0 from Kaggle submission {sub.ref}" in r.stdout
    shown = mmfold("submit", "--data", "d", "--show")
    table = submit.log_table("d")
    assert table.loc[0, "cv_mean"] == 0.8 and table.loc[0, "lb"] == 0.81234  # CV beside LB
    assert "0.8123" in shown.stdout and "0.8000" in shown.stdout
    again = mmfold("submit", "--data", "d", "--name", "s0", "--kaggle")
    one_line_error(again, "on the leaderboard already", f"Kaggle submission {sub.ref}", "FORCE=1")
    assert len(state.submissions) == 1


def unchanged(data: str) -> Callable[[], None]:
    """A check that the log and ``lb.csv`` are byte for byte as they are now."""
    log, lb = submit.log_path(data), submit.lb_path(data)
    before = (log.read_bytes(), lb.read_bytes() if lb.exists() else None)

    def check() -> None:
        assert (log.read_bytes(), lb.read_bytes() if lb.exists() else None) == before

    return check


def test_no_submission_left_today_is_refused_before_any_upload(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path) -> None:
    state, _ = server
    state.allowed_today = 0
    state.submissions.append(Submission(1, SLUG, "earlier", b""))  # made today: Kaggle counts it
    same = unchanged("d")
    one_line_error(mmfold("submit", "--data", "d", "--name", "s0", "--kaggle"), "no Kaggle submissions left today")
    assert state.calls("StartSubmissionUpload") == [] and state.uploads == {}
    same()


def _older_server_at_its_daily_limit(state: Any) -> None:
    state.limits_endpoint, state.allowed_today = False, 0  # an older server: the refusal comes at submit


def _expects_another_header(state: Any) -> None:
    state.competitions[SLUG].header = "Id,Predicted"


@pytest.mark.parametrize("arrange, words", [
    (_older_server_at_its_daily_limit, ("HTTP 400", "used its daily submission allowance")),
    (_expects_another_header, ("Kaggle could not score submission",
                               "wrong header: expected 'Id,Predicted', got 'ImageID,Labels'",
                               "to send it again: make submit DATA=d FORCE=1 NAME=s0 KAGGLE=1")),
], ids=["daily limit at submit", "format error"])
def test_a_refusal_at_submit_is_kaggles_own_words_in_one_line_and_nothing_is_logged(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path, arrange: Callable[[Any], None],
        words: tuple[str, ...]) -> None:
    state, _ = server
    arrange(state)
    same = unchanged("d")
    one_line_error(mmfold("submit", "--data", "d", "--name", "s0", "--kaggle"), *words)
    same()


def test_a_submission_kaggle_does_not_show_yet_is_waited_for(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path) -> None:
    """Kaggle's reads lag its writes: a submission just made can be a 404 for a moment."""
    state, _ = server
    state.competitions[SLUG].unknown_reads = 2
    r = mmfold("submit", "--data", "d", "--name", "s0", "--kaggle")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("not visible yet") == 2 and len(state.calls("CreateSubmission")) == 1
    assert submit.read_lb("d")["lb"].tolist() == ["0.81234"]


def test_a_wait_cut_short_is_resumed_without_submitting_twice(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path) -> None:
    state, _ = server
    state.competitions[SLUG].polls_before_score = 100
    same = unchanged("d")
    one_line_error(mmfold("submit", "--data", "d", "--name", "s0", "--kaggle", "--wait", "0"),
                   "no public score for submission", "run the same command again")
    same()
    state.competitions[SLUG].polls_before_score = 0
    r = mmfold("submit", "--data", "d", "--name", "s0", "--kaggle")
    assert r.returncode == 0, r.stderr
    assert len(state.calls("CreateSubmission")) == 1 and f"was submitted to {SLUG} before" in r.stdout
    assert submit.read_lb("d")["ref"].tolist() == [str(state.submissions[0].ref)]


def test_submit_kaggle_needs_the_competition_named_in_the_data_config(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path, project: Path) -> None:
    state, _ = server
    (project / "configs" / "data" / "d.yaml").write_text(yaml.safe_dump({"data": {"metric": "samples"}}))
    one_line_error(mmfold("submit", "--data", "d", "--name", "s0", "--kaggle"), "data.kaggle is not set",
                   "configs/data/d.yaml")
    assert state.requests == []


def test_data_kaggle_is_a_checked_slug_that_never_changes_learning(project: Path) -> None:
    (project / "configs" / "data" / "d.yaml").write_text(yaml.safe_dump({"data": {"kaggle": SLUG}}))
    assert load_config("d").data.kaggle == SLUG
    with pytest.raises(ConfigError, match="data.kaggle: 'https://www.kaggle.com/c/x' is not a competition slug"):
        load_config("d", overrides=["data.kaggle=https://www.kaggle.com/c/x"])
    assert learning_diff({"data": {"kaggle": None}}, {"data": {"kaggle": SLUG}}) == {}


# ---- export --kaggle-dataset -----------------------------------------------------------------


def bundle(project: Path) -> Path:
    """A bundle folder as ``mmfold export`` leaves it (the upload takes it as it is)."""
    out = project / "exports" / "d" / "s0"
    (out / "runs" / "d" / "tfidf" / "fold0").mkdir(parents=True)
    (out / "runs" / "d" / "tfidf" / "fold0" / "member.skops").write_bytes(b"\x00fitted")
    (out / "predict.py").write_text("from mmfold.bundle import main\n")
    (out / "bundle.json").write_text(json.dumps({"data": "d", "blend": "s0", "created": "2026-01-01T00:00:00Z"}))
    return out


def test_export_creates_a_private_dataset_of_the_bundle_then_versions_it(
        mmfold: Run, server: tuple[Kaggle, str], logged: Path, project: Path) -> None:
    state, _ = server
    out = bundle(project)
    before = sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    r = mmfold("export", "--data", "d", "--name", "s0", "--kaggle-dataset", "alice/mmfold-s0")
    assert r.returncode == 0, r.stderr
    assert "created private Kaggle dataset alice/mmfold-s0" in r.stdout
    (first,) = state.datasets["alice/mmfold-s0"]
    assert first["private"] is True and first["license"] == "copyright-authors" and first["title"] == "mmfold d s0"
    files = first["files"]
    assert sorted(files) == ["bundle.json", "predict.py", "runs.zip"]  # no dataset-metadata.json
    assert files["predict.py"] == (out / "predict.py").read_bytes()
    with zipfile.ZipFile(io.BytesIO(files["runs.zip"])) as z:
        assert z.read("d/tfidf/fold0/member.skops") == b"\x00fitted"
    after = sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    assert after == before and sorted(p.name for p in out.parent.iterdir()) == ["s0"]  # bundle untouched
    r = mmfold("export", "--data", "d", "--name", "s0", "--kaggle-dataset", "alice/mmfold-s0")
    assert r.returncode == 0 and "new version of Kaggle dataset alice/mmfold-s0" in r.stdout, r.stderr
    second = state.datasets["alice/mmfold-s0"][1]
    assert second["notes"].startswith("mmfold d/s0: honest CV 0.8000") and sorted(second["files"]) == sorted(files)
    one_line_error(mmfold("export", "--data", "d", "--name", "s0", "--kaggle-dataset", "mmfold-s0"),
                   "give owner/slug")
