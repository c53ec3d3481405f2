"""A stand-in for the Hugging Face hub on 127.0.0.1, for tests of the real `huggingface_hub` and
`datasets` clients (pointed at it with `HF_ENDPOINT`). No hub is reachable from CI.

It serves the endpoints those clients request (read from huggingface_hub 2.4 / datasets 5.2):

    GET  /api/{models|datasets}/{repo}[/revision/{rev}]      repo info: sha, siblings (+ sizes)
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]   file listing (recursive or not)
    POST /api/{models|datasets}/{repo}/paths-info/{rev}      info on named paths
    HEAD|GET /{repo}/resolve/{rev}/{file}                    a model file; /datasets/{repo}/... for datasets

with the headers the clients rely on (`X-Repo-Commit`, `ETag`, `X-Linked-Size`,
`Content-Length`, `Accept-Ranges`), `Range` requests answered with 206, the hub's error headers
(`X-Error-Code: RepoNotFound` / `GatedRepo` / `RevisionNotFound` / `EntryNotFound`), and two
fault modes: a gated repo (401 without the right bearer token), a file whose first download
is cut off half way (the connection drops after `drop_after` bytes), and a repo listing that
reports sizes larger than the files (`listed_sizes`, for the disk-space check).
"""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]
    sha: str = ""
    gated_token: str | None = None  # set: files need `Authorization: Bearer <token>`
    drop_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before the first drop
    listed_sizes: dict[str, int] = field(default_factory=dict)  # file -> size the repo listing reports

    def __post_init__(self) -> None:
        if not self.sha:
            h = hashlib.sha1(self.repo_id.encode())
            for name in sorted(self.files):
                h.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.sha = h.hexdigest()

    def entry(self, path: str) -> dict:
        data = self.files[path]
        info = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if path.endswith((".safetensors", ".gguf", ".parquet")):
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info

    def folders(self) -> set[str]:
        out = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return out


def repo_from_folder(repo_id: str, folder: Path, repo_type: str = "model", **kwargs) -> Repo:
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return Repo(repo_id, repo_type, files, **kwargs)


class HubServer:
    """`with HubServer() as hub: hub.add(repo); os.environ["HF_ENDPOINT"] = hub.url`."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._dropped: set[tuple[str, str]] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo: Repo) -> Repo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        return repo

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet test output
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)) if "Content-Length" not in (headers or {}) else headers["Content-Length"])
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, *, head: bool = False, repo: Repo | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _repo(self, kind: str, repo_id: str, *, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    def _revision_ok(self, repo: Repo, rev: str, *, head: bool = False) -> bool:
        if urllib.parse.unquote(rev) in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
        return False

    def _authorised(self, repo: Repo) -> bool:
        return repo.gated_token is None or self.headers.get("Authorization") == f"Bearer {repo.gated_token}"

    # ------------------------------------------------------------------ routes

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        self.hub.requests.append((method, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        head = method == "HEAD"
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            kind = parts[1][:-1]
            repo = self._repo(kind, f"{parts[2]}/{parts[3]}")
            if repo is None:
                return
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                if rest and not self._revision_ok(repo, rest[1]):
                    return
                return self._info(repo)
            if rest[0] == "tree" and len(rest) >= 2:
                if not self._revision_ok(repo, rest[1]):
                    return
                prefix = urllib.parse.unquote("/".join(rest[2:]))
                return self._tree(repo, prefix, query.get("recursive", ["False"])[0].lower() == "true")
            if rest[0] == "paths-info" and method == "POST":
                if not self._revision_ok(repo, rest[1]):
                    return
                return self._paths_info(repo)
            return self._error(404, "EntryNotFound", "no such endpoint")
        kind = "model"
        if parts[0] == "datasets":
            kind, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(kind, f"{parts[0]}/{parts[1]}", head=head)
            if repo is None or not self._revision_ok(repo, parts[3], head=head):
                return
            return self._file(repo, urllib.parse.unquote("/".join(parts[4:])), head=head)
        self._error(404, "RepoNotFound", "not found", head=head)

    def _info(self, repo: Repo) -> None:
        self._json(
            {
                "id": repo.repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "disabled": False,
                "tags": [],
                "siblings": [
                    {"rfilename": p, "size": repo.listed_sizes.get(p, len(d)), "blobId": hashlib.sha1(d).hexdigest()}
                    for p, d in sorted(repo.files.items())
                ],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "cardData": {},
            }
        )

    def _tree(self, repo: Repo, prefix: str, recursive: bool) -> None:
        prefix = prefix.strip("/")
        if prefix and prefix not in repo.folders():
            return self._error(404, "EntryNotFound", f"{prefix} does not exist", repo=repo)
        base = f"{prefix}/" if prefix else ""
        out = []
        for folder in sorted(repo.folders()):
            if folder.startswith(base) and (recursive or "/" not in folder[len(base) :]):
                out.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0})
        for path in sorted(repo.files):
            if path.startswith(base) and (recursive or "/" not in path[len(base) :]):
                out.append(repo.entry(path))
        self._json(out)

    def _paths_info(self, repo: Repo) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(body).get("paths", [])
        else:
            paths = urllib.parse.parse_qs(body).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in repo.files:
                out.append(repo.entry(p))
            elif p in repo.folders() or p == "":
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
        self._json(out)

    def _file(self, repo: Repo, name: str, *, head: bool) -> None:
        if not self._authorised(repo):
            return self._error(
                401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated to access it. Please log in.",
                head=head, repo=repo,
            )
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head=head, repo=repo)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": etag,
            "X-Linked-Size": str(len(data)),
            "X-Linked-Etag": etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        key = (repo.repo_id, name)
        cut = repo.drop_after.get(name)
        if not head and cut is not None and start == 0 and key not in self.hub._dropped:
            self.hub._dropped.add(key)  # drop once: the client's retry with Range must finish it
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(status, data, {**headers, "Content-Length": str(len(data))}, head=head)
