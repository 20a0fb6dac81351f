"""A stdlib HTTP server answering the Hub endpoints of `create_repo`, `upload_folder` and downloads.

Tests point `HF_ENDPOINT` at it (in a subprocess, since huggingface_hub reads the variable at import) and then read
what was created and uploaded. Repos whose name contains `fail` refuse every commit with HTTP 403, as for a token
without write access (a 5xx would make the client retry with back-off for ~20 s).

`FakeHub.mode` makes every request misbehave, as a broken Hub would: `"hang"` (accept, never answer, until the
server stops), `"error500"` (HTTP 500) or `"close"` (close the connection without a response); `"ok"` by default.
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# The single commit every repo is at.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Records `repos[repo_id] = {"private": bool, "files": {path: bytes}}` and the `Authorization` headers seen."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.authorizations: list[str] = []
        self.requests: list[str] = []
        self.mode = "ok"
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict | list | None = None, headers: dict | None = None) -> None:
                payload = json.dumps({} if body is None else body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _record(self) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                hub.authorizations.append(self.headers.get("Authorization") or "")

            def _misbehave(self) -> bool:
                """Answer as `hub.mode` says; True when the request was handled that way."""
                if hub.mode == "hang":
                    hub._release.wait(300)
                    self.close_connection = True
                    return True
                if hub.mode == "error500":
                    self._reply(500, {"error": "Internal Error"})
                    return True
                if hub.mode == "close":
                    self.close_connection = True
                    return True
                return False

            def do_HEAD(self):
                """Model info and file downloads of what was uploaded (`from_pretrained`, `ModelCard.load`)."""
                self._record()
                if self._misbehave():
                    return None
                parts = self.path.split("?")[0].split("/")
                # /api/models/{org}/{name}[/revision/{revision}]
                if parts[1:3] == ["api", "models"] and (len(parts) == 5 or parts[5:6] == ["revision"]):
                    repo = hub.repos.get(f"{parts[3]}/{parts[4]}")
                    if repo is None:
                        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    siblings = [{"rfilename": path} for path in sorted(repo["files"])]
                    info = {
                        "id": f"{parts[3]}/{parts[4]}",
                        "sha": COMMIT,
                        "siblings": siblings,
                        "private": repo["private"],
                    }
                    return self._reply(200, info)
                # /api/models/{org}/{name}/tree/{revision}: the file listing of `snapshot_download`
                if parts[1:3] == ["api", "models"] and parts[5:6] == ["tree"]:
                    files = hub.repos.get(f"{parts[3]}/{parts[4]}", {"files": {}})["files"]
                    listing = [
                        {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                        for path, content in sorted(files.items())
                    ]
                    return self._reply(200, listing)
                # /{org}/{name}/resolve/{revision}/{path...}
                if len(parts) >= 6 and parts[3] == "resolve":
                    content = hub.repos.get(f"{parts[1]}/{parts[2]}", {"files": {}})["files"].get("/".join(parts[5:]))
                    if content is not None:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(content)))
                        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                        self.send_header("X-Repo-Commit", COMMIT)
                        self.end_headers()
                        if self.command == "GET":
                            self.wfile.write(content)
                        return None
                self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

            do_GET = do_HEAD

            def do_POST(self):
                self._record()
                if self._misbehave():
                    return None
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = (
                        f"{request['organization']}/{request['name']}"
                        if request.get("organization")
                        else request["name"]
                    )
                    private = bool(request.get("private")) or request.get("visibility") == "private"
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":  # the README's metadata, checked before the commit
                    return self._reply(200, {})
                parts = path.split("/")  # /api/models/{org}/{name}/{preupload|commit}/{revision}
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                        return self._reply(200, {"files": modes})
                    if action == "commit":
                        if "fail" in repo_id:
                            return self._reply(
                                403, {"error": "You don't have the rights to create a commit in this repo."}
                            )
                        for line in body.decode().splitlines():
                            entry = json.loads(line)
                            if entry["key"] == "file":
                                value = entry["value"]
                                hub.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
                        return self._reply(
                            200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{COMMIT}", "commitOid": COMMIT}
                        )
                self._reply(404, {"error": f"Unknown endpoint {path}"})

        return Handler
