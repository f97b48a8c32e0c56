"""A local HTTP server for weights downloads in tests (the standard library's http.server in a thread)."""

from __future__ import annotations

import http.server
import threading
import time


class WeightsServer:
    """http.server on 127.0.0.1 (port 0) serving `files` {path: bytes}; paths in `truncated` send half the bytes
    under a Content-Length promising all, paths in `slow` answer after 1 s; every request is counted."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.slow: set[str] = set()
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path in owner.slow:
                    time.sleep(1.0)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[: len(body) // 2] if self.path in owner.truncated else body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up first (the timeout test)
                    pass
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
