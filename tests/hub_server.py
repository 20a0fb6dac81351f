"""A stdlib HTTP server answering the Hub endpoints that `create_repo`, `upload_folder` and `ModelCard.load` call.

Tests point `HF_ENDPOINT` at it (in a subprocess, since huggingface_hub reads the variable at import) and then read
what was created and uploaded. Repos whose name contains `fail` refuse every commit with HTTP 500.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Records `repos[repo_id] = {"private": bool, "files": {path: bytes}}` and the `Authorization` headers seen."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.authorizations: list[str] = []
        self.requests: list[str] = []
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
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
                payload = json.dumps(body or {}).encode()
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

            def do_HEAD(self):  # file downloads (`ModelCard.load`): nothing is ever there
                self._record()
                self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

            do_GET = do_HEAD

            def do_POST(self):
                self._record()
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
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
                            return self._reply(500, {"error": "Internal Error - We're working hard to fix this."})
                        for line in body.decode().splitlines():
                            entry = json.loads(line)
                            if entry["key"] == "file":
                                value = entry["value"]
                                hub.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
                        commit = "0" * 40
                        return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit}", "commitOid": commit})
                self._reply(404, {"error": f"Unknown endpoint {path}"})

        return Handler
