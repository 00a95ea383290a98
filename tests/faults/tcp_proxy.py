"""A loopback TCP proxy that can take an S3 endpoint down and bring it back, for the fault suite.

moto keeps its objects in memory, so stopping the moto process itself would lose the bucket. What a
client sees when an object store restarts (connections reset, then refused, then accepted again with
the data still there, as MinIO with a volume does) is produced here by a proxy in front of moto:
:meth:`TcpProxy.go_down` closes the listening socket and resets every open connection,
:meth:`TcpProxy.come_back` listens again on the same port. ``down_after_puts=N`` takes the endpoint
down by itself the moment the client starts its (N+1)-th ``PUT`` request, before a byte of it is
forwarded, so the cut lands mid-run at a reproducible point.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream_port>`` until told to go down.

    Args:
        upstream_port: the real server's port on 127.0.0.1.
        down_after_puts: go down when the (N+1)-th HTTP ``PUT`` starts (None: never by itself).
        down_for_s: when it went down by itself, come back after this many seconds (None: stay down).
    """

    def __init__(self, upstream_port: int, down_after_puts: int | None = None, down_for_s: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.down_after_puts = down_after_puts
        self.down_for_s = down_for_s
        self.puts = 0
        self.outages = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.come_back()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        """Whether the proxy is accepting connections."""
        return self._listener is not None

    def come_back(self) -> None:
        """Listen on the same port again (no-op when up)."""
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def go_down(self) -> None:
        """Stop listening and reset every open connection (clients see resets, then refusals)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            if listener is not None:
                self.outages += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            with contextlib.suppress(OSError):
                c.close()

    def close(self) -> None:
        """Go down for good."""
        self.down_after_puts = None
        self.down_for_s = None
        self.go_down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _starts_put(self, chunk: bytes) -> bool:
        """Count a request starting in ``chunk``; True when it is the PUT that takes us down."""
        if not chunk.startswith(b"PUT "):
            return False
        with self._lock:
            self.puts += 1
            return self.down_after_puts is not None and self.puts > self.down_after_puts

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                if from_client and self._starts_put(chunk):
                    self.down_after_puts = None  # once
                    self.go_down()
                    if self.down_for_s is not None:
                        threading.Thread(target=self._back_after, args=(self.down_for_s,), daemon=True).start()
                    return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _back_after(self, seconds: float) -> None:
        time.sleep(seconds)
        self.come_back()
