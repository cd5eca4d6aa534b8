"""Sentry's edge for a subprocess: a tiny HTTP server on 127.0.0.1 that takes envelopes.

A consumer run with `SENTRY_DSN=<ingest.dsn>` sends its events and transactions here exactly as
it would to sentry.io (the SDK's own HTTP transport, gzip and all), so a test reads what would
have left the process: the raw bodies, to prove what is never in them, and the parsed items.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sentry_sdk.envelope import Envelope


class SentryIngest:
    """Envelopes received, in arrival order."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []  # each envelope as sent, decompressed
        self._lock = threading.Lock()
        ingest = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding:
                    raise AssertionError(f"unexpected Content-Encoding {encoding}")
                with ingest._lock:
                    ingest.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def dsn(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://public@{host!s}:{port}/1"

    def items(self, kind: str) -> list[dict[str, Any]]:
        """The JSON payloads of every item of `kind` (`transaction`, `event`, ...)."""
        with self._lock:
            bodies = list(self.bodies)
        found = []
        for body in bodies:
            for item in Envelope.deserialize(body).items:
                if item.type == kind and item.payload.json is not None:
                    found.append(item.payload.json)
        return found

    def transactions(self, name: str) -> list[dict[str, Any]]:
        return [t for t in self.items("transaction") if t.get("transaction") == name]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
