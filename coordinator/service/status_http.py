"""GET /status (fleet and rounds as JSON) and GET /healthz, from the standard library's server.

Read-only and served from its own thread; it reads the store through its own sessions, so it
never blocks the round engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_status(host: str, port: int, snapshot: Callable[[], dict]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if self.path.rstrip("/") == "/status":
                body, code = json.dumps(snapshot(), default=str).encode(), 200
            elif self.path.rstrip("/") == "/healthz":
                body, code = b'{"ok": true}', 200
            else:
                body, code = b'{"error": "not found; try /status or /healthz"}', 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # requests are not worth a log line each
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="status-http", daemon=True).start()
    return server
