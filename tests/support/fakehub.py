"""A Hugging Face Hub on loopback, serving the few routes `huggingface_hub.snapshot_download` calls, so a
test fills a cache the way `hf download` does: `huggingface_hub` itself writes the blobs, snapshots and refs.

    with FakeHub({"owner/name": {"config.json": b"{}", "sub/w.safetensors": data}}) as hub:
        snapshot_download("owner/name", endpoint=hub.url, cache_dir=cache)
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `folder` as {prefix + relative path: bytes}."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-hub").start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(h.path.split("?")[0])
        if path.startswith("/api/models/"):  # repo info (/revision/REV) and its file list (/tree/REV)
            rest = path[len("/api/models/"):]
            repo = rest.partition("/revision/")[0].partition("/tree/")[0]
            if repo not in self.repos:
                return self._send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            files = self.repos[repo]
            if "/tree/" in rest:
                body = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for f, d in files.items()]  # fmt: skip
            else:
                body = {"id": repo, "sha": self.commits[repo], "siblings": [{"rfilename": f} for f in files]}
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        for repo, files in self.repos.items():  # a file: /REPO/resolve/REV/PATH
            if path.startswith(f"/{repo}/resolve/"):
                name = path[len(f"/{repo}/resolve/"):].partition("/")[2]
                if name not in files:
                    return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                data = files[name]
                headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._send(h, 200, data, headers, head)
        self._send(h, 404, b"", {}, head)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
