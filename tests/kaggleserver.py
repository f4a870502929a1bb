"""A stand-in for Kaggle's API on the loopback address, for the official ``kaggle`` client.

The client (``kaggle`` 2.x on ``kagglesdk``) posts JSON to ``<endpoint>/api/v1/<service>/<method>``
and reads camelCase JSON back. Its endpoint is not a free setting: ``KAGGLE_API_ENVIRONMENT=
LOCALHOST`` makes it talk to ``http://localhost`` (port 80) instead of ``https://api.kaggle.com``.
The tests run the real client that way, with the standard ``http_proxy`` variable naming this
server (``requests`` honours it), so every request reaches it on a free port of ``127.0.0.1``
and nothing leaves the machine. A request line then carries the absolute URL; the handler
routes on its path.

Endpoints answered (the few mmfold uses):

- ``competitions.CompetitionApiService/DownloadDataFiles``: a 302 to ``/files/<slug>.zip``,
  then ``GET`` of that zip (403 until the rules are accepted, 404 for an unknown slug).
- ``.../GetSubmissionLimits``, ``.../StartSubmissionUpload`` (an upload URL on this server,
  ``PUT /upload/<token>``), ``.../CreateSubmission``, ``.../GetSubmission`` (``PENDING`` for
  the first polls, then ``COMPLETE`` with the score, or ``ERROR`` when the uploaded CSV's
  header is not the competition's), ``.../ListSubmissions``.
- ``datasets.DatasetApiService/GetDatasetStatus``, ``.../CreateDataset``,
  ``.../CreateDatasetVersion`` and ``blobs.BlobApiService/StartBlobUpload``.

Credentials: HTTP basic ``username:key`` as in ``kaggle.json``; anything else is a 401.
Every request is recorded, uploads keep their bytes, so a test asserts what was sent.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.loopback import LoopbackServer

HOST = "http://localhost"  # what the client's LOCALHOST environment calls


@dataclass
class Competition:
    """One competition: its data files, the header its scorer expects, the score it gives."""

    files: dict[str, bytes]
    header: str = "ImageID,Labels"
    score: str = "0.81234"
    rules_accepted: bool = True
    polls_before_score: int = 1  # GetSubmission answers PENDING this many times first
    unknown_reads: int = 0  # GetSubmission answers 404 this many times first (Kaggle's reads lag its writes)


@dataclass
class Submission:
    ref: int
    slug: str
    description: str
    data: bytes
    polls: int = 0


@dataclass
class Kaggle:
    """The server's state: users, competitions, submissions, datasets, and what it was asked."""

    users: dict[str, str] = field(default_factory=lambda: {"alice": "secret-key"})
    competitions: dict[str, Competition] = field(default_factory=dict)
    allowed_today: int = 5
    limits_endpoint: bool = True  # False: GetSubmissionLimits is a 404, as on an older server
    daily_limit_message: str = ("Submission not allowed: your team has used its daily submission "
                                "allowance (5) today, please try again tomorrow UTC")
    submissions: list[Submission] = field(default_factory=list)
    datasets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # ref -> versions
    uploads: dict[str, bytes] = field(default_factory=dict)  # token -> bytes PUT
    blob_names: dict[str, str] = field(default_factory=dict)  # token -> file name announced
    requests: list[tuple[str, str, Any]] = field(default_factory=list)  # (method, path, json body)
    next_ref: int = 41000

    def calls(self, method: str) -> list[Any]:
        """The JSON bodies of every call to an API method (``CreateSubmission``)."""
        return [body for _, path, body in self.requests if path.endswith("/" + method)]


def zipped(files: dict[str, bytes]) -> bytes:
    """The competition's files as the one zip Kaggle serves."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _handler(k: Kaggle) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, v in (headers or {}).items():
                self.send_header(key, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, code: int = 200) -> None:
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, code: int, message: str) -> None:
            self._json({"code": code, "message": message}, code)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if not size:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Basic "):
                return None
            user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            return user if k.users.get(user) == key else None

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            k.requests.append(("GET", path, None))
            slug = path.removeprefix("/files/").removesuffix(".zip")
            comp = k.competitions.get(slug)
            if not path.startswith("/files/") or comp is None:
                return self._send(404, b"not found")
            self._send(200, zipped(comp.files), {"Content-Type": "application/zip"})

        def do_PUT(self) -> None:
            path = urlsplit(self.path).path
            data = self._body()
            k.requests.append(("PUT", path, len(data)))
            token = path.removeprefix("/upload/")
            if token not in k.blob_names:
                return self._send(404, b"no such upload")
            k.uploads[token] = data
            self._send(200, b"")

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            raw = self._body()
            body = json.loads(raw or b"{}")
            k.requests.append(("POST", path, body))
            if not path.startswith("/api/v1/"):
                return self._error(404, "NotFound")
            if self._user() is None:
                return self._error(401, "Unauthenticated")
            method = path.rsplit("/", 1)[-1]
            handler = getattr(self, f"_{method}", None)
            if handler is None:
                return self._error(404, f"no method {method}")
            with lock:
                handler(body)

        # ---- competitions ------------------------------------------------------------------

        def _competition(self, body: dict[str, Any]) -> Competition | None:
            comp = k.competitions.get(body.get("competitionName", ""))
            if comp is None:
                self._error(404, "NotFound")
            return comp

        def _DownloadDataFiles(self, body: dict[str, Any]) -> None:
            comp = self._competition(body)
            if comp is None:
                return
            if not comp.rules_accepted:
                return self._error(403, "You must accept this competition's rules before you'll be "
                                        "able to download files.")
            self._send(302, b"", {"Location": f"{HOST}/files/{body['competitionName']}.zip"})

        def _GetSubmissionLimits(self, body: dict[str, Any]) -> None:
            if not k.limits_endpoint:
                return self._error(404, "NotFound")
            if self._competition(body) is None:
                return
            made = sum(s.slug == body["competitionName"] for s in k.submissions)
            self._json({"numToday": made, "numTotal": made, "numAllowedNow": k.allowed_today})

        def _new_upload(self, name: str) -> dict[str, str]:
            token = f"blob{len(k.blob_names) + 1}"
            k.blob_names[token] = name
            return {"token": token, "createUrl": f"{HOST}/upload/{token}"}

        def _StartSubmissionUpload(self, body: dict[str, Any]) -> None:
            if self._competition(body) is not None:
                self._json(self._new_upload(body["fileName"]))

        def _CreateSubmission(self, body: dict[str, Any]) -> None:
            if self._competition(body) is None:
                return
            if k.allowed_today <= 0:
                return self._error(400, k.daily_limit_message)
            token = body.get("blobFileTokens", "")
            if token not in k.uploads:
                return self._error(400, "the uploaded file was not found")
            k.allowed_today -= 1
            k.next_ref += 1
            k.submissions.append(Submission(k.next_ref, body["competitionName"],
                                            body.get("submissionDescription", ""), k.uploads[token]))
            self._json({"message": "Successfully submitted", "ref": k.next_ref})

        def _submission_json(self, s: Submission) -> dict[str, Any]:
            comp = k.competitions[s.slug]
            out: dict[str, Any] = {"ref": s.ref, "description": s.description, "fileName": "submission.csv",
                                   "date": "2026-01-01T00:00:00Z"}
            if s.polls <= comp.polls_before_score:
                return out | {"status": "PENDING"}
            header = s.data.decode("utf-8", "replace").splitlines()[0] if s.data else ""
            if header != comp.header:
                return out | {"status": "ERROR", "errorDescription":
                              f"Submission file has the wrong header: expected {comp.header!r}, got {header!r}"}
            return out | {"status": "COMPLETE", "publicScore": comp.score}

        def _GetSubmission(self, body: dict[str, Any]) -> None:
            found = [s for s in k.submissions if s.ref == int(body.get("ref", 0))]
            if not found:
                return self._error(404, "NotFound")
            comp = k.competitions[found[0].slug]
            if comp.unknown_reads > 0:
                comp.unknown_reads -= 1
                return self._error(404, "NotFound")
            found[0].polls += 1
            self._json(self._submission_json(found[0]))

        def _ListSubmissions(self, body: dict[str, Any]) -> None:
            if self._competition(body) is None:
                return
            mine = [s for s in reversed(k.submissions) if s.slug == body["competitionName"]]
            self._json({"submissions": [self._submission_json(s) for s in mine]})

        # ---- datasets ----------------------------------------------------------------------

        def _StartBlobUpload(self, body: dict[str, Any]) -> None:
            self._json(self._new_upload(body["name"]))

        def _GetDatasetStatus(self, body: dict[str, Any]) -> None:
            if f"{body.get('ownerSlug')}/{body.get('datasetSlug')}" not in k.datasets:
                return self._error(404, "Dataset not found")
            self._json({"status": "READY"})

        def _files(self, files: list[dict[str, Any]]) -> dict[str, bytes]:
            return {k.blob_names[f["token"]]: k.uploads[f["token"]] for f in files}

        def _CreateDataset(self, body: dict[str, Any]) -> None:
            ref = f"{body['ownerSlug']}/{body['slug']}"
            if ref in k.datasets:
                return self._json({"error": "slug already in use"})
            k.datasets[ref] = [{"private": body.get("isPrivate", False), "title": body.get("title"),
                                "license": body.get("licenseName"), "notes": "",
                                "files": self._files(body.get("files", []))}]
            self._json({"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})

        def _CreateDatasetVersion(self, body: dict[str, Any]) -> None:
            ref = f"{body['ownerSlug']}/{body['datasetSlug']}"
            if ref not in k.datasets:
                return self._error(404, "Dataset not found")
            b = body.get("body", {})
            k.datasets[ref].append({"notes": b.get("versionNotes", ""), "files": self._files(b.get("files", []))})
            self._json({"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})

    return Handler


class KaggleServer(LoopbackServer):
    """``with KaggleServer(state) as proxy:`` serves ``state`` on ``127.0.0.1`` at a free port;
    ``proxy`` is the URL to put in ``http_proxy``."""

    def __init__(self, state: Kaggle) -> None:
        self.state = state
        super().__init__(_handler(state))
