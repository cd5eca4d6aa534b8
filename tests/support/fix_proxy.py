"""pytest plugin: a TCP proxy in front of a server, to simulate losing the network to it.

`tcp_proxy(host, port)` listens on 127.0.0.1 (a free port) and forwards every connection to
`host:port`, one thread per connection. `cut()` drops every open connection and, until
`restore()`, resets each new one as soon as it is accepted, as when a server or the path to it
goes away: clients see their connection closed or reset. Proxies close themselves at teardown.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

_ACCEPT_POLL_SECONDS = 0.1  # how long close() may wait for the accept loop to notice
_CONNECT_TIMEOUT_SECONDS = 5.0
_CHUNK = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a target; `cut()` drops the link until `restore()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._start(self._accept_loop, "tcp-proxy-accept")

    def cut(self) -> None:
        """Drop every open connection, and reset every new one until `restore()`."""
        self._cut.set()
        with self._lock:
            for sock in self._open:
                _reset(sock)

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut.clear()

    def close(self) -> None:
        """Stop accepting, reset what is open and wait for every proxy thread to end."""
        self._closed.set()
        accept_thread, *forward_threads = self._threads
        accept_thread.join()
        self._listener.close()
        self.cut()
        for thread in forward_threads:
            thread.join()

    def _start(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = None if self._cut.is_set() else self._connect_upstream()
            # Admission and cut() both hold the lock: a connection is either in the open set
            # when a cut resets it, or sees the cut here.
            with self._lock:
                admitted = upstream is not None and not self._cut.is_set()
                if upstream is not None and admitted:
                    self._open.update((client, upstream))
            if not admitted:
                for sock in (client, upstream):
                    if sock is not None:
                        _reset(sock)
                        sock.close()
                continue
            self._start(self._forward, "tcp-proxy-forward", client, upstream)

    def _connect_upstream(self) -> socket.socket | None:
        try:
            upstream = socket.create_connection(self._target, _CONNECT_TIMEOUT_SECONDS)
        except OSError:
            return None
        upstream.settimeout(None)
        return upstream

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until either side hangs up or a cut resets them; then close both."""
        peers = {client: upstream, upstream: client}
        try:
            with selectors.DefaultSelector() as selector:
                for sock in peers:
                    selector.register(sock, selectors.EVENT_READ)
                while True:
                    for key, _ in selector.select():
                        source = client if key.fileobj is client else upstream
                        data = source.recv(_CHUNK)
                        if not data:
                            return  # neither client here half-closes: one FIN ends it all
                        peers[source].sendall(data)
        except OSError:
            pass  # reset by cut() or by a peer: the connection is over either way
        finally:
            # Sockets leave the open set (under the lock) before they are closed, so cut()
            # never touches a closed socket.
            with self._lock:
                self._open.difference_update(peers)
            for sock in peers:
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Abort `sock` with an RST; wakes a thread blocked reading it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """Make proxies with `tcp_proxy(host, port)`; all are closed when the test ends."""
    made: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()
