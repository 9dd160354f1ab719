"""A stand-in for the Hugging Face Hub: a stdlib HTTP server on 127.0.0.1 that serves repos under
the Hub's URL layout, so the real huggingface_hub (HF_ENDPOINT=http://127.0.0.1:PORT) downloads
from it exactly as from huggingface.co. What huggingface_hub 2.4 calls (read in its hf_api.py,
file_download.py and _snapshot_download.py):

  GET  /api/{models|datasets}/{repo}/revision/{rev}     repo_info: {"id", "sha", "siblings"}
  GET  /api/{models|datasets}/{repo}/tree/{rev}          list_repo_tree (snapshot_download's file list):
                                                         [{"type": "file", "path", "size", "oid", "lfs"}]
  HEAD /{repo}/resolve/{rev}/{file}                      get_hf_file_metadata: X-Repo-Commit,
  HEAD /datasets/{repo}/resolve/{rev}/{file}             X-Linked-Etag (the blob's name in the cache),
                                                         X-Linked-Size, Content-Length; no X-Xet-Hash, so
                                                         huggingface_hub downloads over plain HTTP
  GET  the same                                          the bytes; Range: bytes=a-[b] -> 206 (resume,
                                                         safetensors header reads)

Errors carry X-Error-Code as the Hub's do (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its typed errors. Fault injection for tests:
`truncate_once` (file names whose first full GET sends half the bytes, then closes the
connection), `gone` (file names answered 404 as if deleted upstream), `gated` (repos that need
`Authorization: Bearer <token>`). Every request is logged (method, path, Range, bytes sent).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=dict)      # branch / tag -> sha (main always)
    sha: str = ""

    def __post_init__(self):
        # a commit id: sha1 over (path, sha256) pairs, as the cache fixtures of tests/test_hub.py
        self.sha = self.sha or hashlib.sha1(json.dumps(sorted(
            (p, hashlib.sha256(b).hexdigest()) for p, b in self.files.items())).encode()).hexdigest()
        self.refs = {"main": self.sha, **self.refs}


@dataclass
class Log:
    method: str
    path: str
    range: str | None
    sent: int


class HubServer:
    def __init__(self, repos: dict[tuple[str, str], Repo], token: str | None = None):
        self.repos = repos                    # (repo_type "model"|"dataset", "org/name") -> Repo
        self.token = token
        self.gated: set[str] = set()
        self.truncate_once: set[str] = set()
        self.gone: set[str] = set()
        self.log: list[Log] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def sent(self, name: str, method: str = "GET") -> list[Log]:
        return [x for x in self.log if x.method == method and x.path.endswith("/" + name)]

    # ---------------------------------------------------------------------------------------------
    def _handler(self):
        server = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"        # one request per connection: a truncated body ends it

            def log_message(self, *a):           # quiet: the test reads server.log
                pass

            def do_GET(self):
                server._serve(self, head=False)

            def do_HEAD(self):
                server._serve(self, head=True)

        return H

    def _error(self, h, status: int, code: str, msg: str) -> None:
        body = json.dumps({"error": msg}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", msg)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, obj, head: bool) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h, kind: str, name: str, rev: str) -> tuple[Repo, str] | None:
        repo = self.repos.get((kind, name))
        if repo is None:
            self._error(h, 404, "RepoNotFound", f"Repository not found: {name}")
            return None
        if name in self.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            self._error(h, 401, "GatedRepo", f"Access to {name} is restricted: you must be authenticated")
            return None
        sha = repo.refs.get(rev, rev if rev == repo.sha else None)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, sha

    def _serve(self, h, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            entry = Log("HEAD" if head else "GET", path, h.headers.get("Range"), 0)
            self.log.append(entry)
        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?$", path)
        if m:
            kind = m[1][:-1]
            found = self._repo(h, kind, m[2], m[4])
            if found is None:
                return
            repo, sha = found
            if m[3] == "revision":
                return self._json(h, {"id": m[2], "sha": sha, "private": False,
                                      "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, head)
            under = (m[5] or "").strip("/")
            return self._json(h, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest(),
                                   "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}}
                                  for p, b in sorted(repo.files.items()) if p.startswith(under)], head)
        m = re.match(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._error(h, 404, "RepoNotFound", f"no route {path}")
        found = self._repo(h, "dataset" if m[1] else "model", m[2], m[3])
        if found is None:
            return
        repo, sha = found
        name = m[4]
        if name not in repo.files or name in self.gone:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist at {sha}")
        self._file(h, repo.files[name], sha, name, head, entry)

    def _file(self, h, data: bytes, sha: str, name: str, head: bool, entry: Log) -> None:
        start, end = 0, len(data)
        rng = h.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), (min(int(b) + 1, len(data)) if b else len(data))
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.send_header("Content-Length", str(end - start))
        h.end_headers()
        if head:
            return
        body = data[start:end]
        with self._lock:
            cut = not rng and name in self.truncate_once
            self.truncate_once.discard(name) if cut else None
        if cut:
            body = body[: len(body) // 2]        # the connection drops half-way: Content-Length promised more
        h.wfile.write(body)
        h.wfile.flush()
        entry.sent = len(body)
