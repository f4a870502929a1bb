"""A stand-in for the Hugging Face hub on the loopback address, for the real client to talk to.

It answers the endpoints ``huggingface_hub`` uses to download: ``HEAD``/``GET
/<repo>/resolve/<revision>/<file>`` (with the commit, ETag and size headers the client reads)
and ``GET /api/models/<repo>/revision/<revision>`` (a snapshot's file list). Point the client
at it with ``HF_ENDPOINT=http://127.0.0.1:<port>``. Every request is recorded, so a test can
say that the client did (or did not) ask for something.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote, urlparse

from tests.loopback import LoopbackServer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass
class Repo:
    """One repo: its commit, files and the revisions (branches, tags) that point at it."""

    files: dict[str, bytes]
    commit: str = ""
    revisions: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest())
                                                    for k, v in self.files.items())).encode())
            self.commit = digest.hexdigest()


@dataclass
class Hub:
    """Repos by id, and the requests seen (``(method, path)``)."""

    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def lookup(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (revision not in repo.revisions and revision != repo.commit):
            return None
        return repo


def _etag(name: str, data: bytes) -> str:
    """sha256 for LFS files (weights), the git blob sha1 otherwise, as the hub sends them."""
    if name.endswith(WEIGHT_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((self.command, path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and "revision" in parts:
                i = parts.index("revision")
                return self._info("/".join(parts[2:i]), parts[i + 1])
            if "resolve" in parts:
                i = parts.index("resolve")
                return self._file("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:]))
            self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})

        def _info(self, repo_id: str, revision: str) -> None:
            repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            doc = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                   "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
            self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

        def _file(self, repo_id: str, revision: str, name: str) -> None:
            repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
            if name not in repo.files:
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            data = repo.files[name]
            tag = _etag(name, data)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{tag}"'}
            if name.endswith(WEIGHT_SUFFIXES):
                headers.update({"X-Linked-Etag": f'"{tag}"', "X-Linked-Size": str(len(data))})
            self._send(200, data, headers)

        do_GET = do_HEAD = _route

    return Handler


class HubServer(LoopbackServer):
    """``with HubServer(hub) as url:`` serves ``hub`` on ``127.0.0.1`` at a free port."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        super().__init__(_handler(hub))
