"""An HTTP mirror on 127.0.0.1 that holds one file back until the test releases it.

The held file's headers go out at once; then one byte every few seconds (so no socket timeout fires),
and the rest once ``release()`` is called. A run that downloads it is therefore still running for as
long as the test wants, whatever the speed of the machine.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KEEPALIVE_S = 2.0


class HeldMirror:
    def __init__(self, directory: Path, held: str):
        self.directory, self.held = directory, held.lstrip("/")
        self.released = threading.Event()
        self.url = ""

    def release(self) -> None:
        self.released.set()


@contextmanager
def held_mirror(directory: Path, held: str) -> Iterator[HeldMirror]:
    """Serve ``directory``; the file at relative path ``held`` waits for ``release()`` (or the end)."""
    mirror = HeldMirror(directory, held)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - stdlib name
            if self.path.lstrip("/") != mirror.held or mirror.released.is_set():
                return super().do_GET()
            data = (mirror.directory / mirror.held).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            sent = 0
            while not mirror.released.wait(KEEPALIVE_S) and sent < len(data) - 1:
                self.wfile.write(data[sent:sent + 1])
                self.wfile.flush()
                sent += 1
            self.wfile.write(data[sent:])

        def log_message(self, format, *args):  # noqa: A002 - stdlib signature
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield mirror
    finally:
        mirror.release()
        server.shutdown()
        server.server_close()
