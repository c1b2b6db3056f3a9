"""A webhook receiver on 127.0.0.1 that records every POST body (JSON decoded)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Receiver:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.lock = threading.Lock()
        self.url = ""

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.posts)


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - stdlib name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                data = json.loads(body)
            except ValueError:
                data = {"raw": body.decode(errors="replace")}
            with receiver.lock:
                receiver.posts.append(data)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format, *args):  # noqa: A002 - stdlib signature
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
