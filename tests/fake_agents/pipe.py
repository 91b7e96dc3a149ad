"""What every fake tunnel agent in tests/ does with traffic (stdlib only; the fakes are
scripts, so they import this by path): accept on a loopback port, pass each HTTP/1.1 request on
to the gateway with the header the real agent adds naming the client, and copy the answers
back, either as they come (a tunnel that streams) or each whole answer at once (a tunnel that
buffers, as Cloudflare's quick tunnels do with GET event streams).

Modes for the client header: "append" adds the client to a comma-separated chain
(X-Forwarded-For, as ngrok does); "set" replaces whatever the client sent with one address
(CF-Connecting-IP, as Cloudflare does; X-Forwarded-For, as tailscaled's proxy does).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import ssl
import threading
from typing import Protocol

HEAD_LIMIT = 65536


class Pipe:
    def __init__(
        self,
        port: int,
        upstream_host: str,
        upstream_port: int,
        *,
        header: str = "X-Forwarded-For",
        mode: str = "append",
        client_address: str | None = None,
        buffer_answers: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.upstream = (upstream_host, upstream_port)
        self.header = header.encode().lower()
        self.header_name = header.encode()
        self.mode = mode
        self.client_address = client_address
        self.buffer_answers = buffer_answers
        self.tls = tls
        self.closed = False
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.tls is not None:
            # The edge ends TLS, as Cloudflare's and ngrok's do (and tailscaled on the machine).
            try:
                client = self.tls.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()
                return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._connections.update((client, upstream))
        address = self.client_address or str(client.getpeername()[0])
        threading.Thread(
            target=self._forward_requests, args=(client, upstream, address), daemon=True
        ).start()
        answers = self._buffer_each_answer if self.buffer_answers else _copy
        threading.Thread(target=answers, args=(upstream, client), daemon=True).start()

    def _forward_requests(
        self, client: socket.socket, upstream: socket.socket, address: str
    ) -> None:
        """Client to upstream, one request at a time, with the client header rewritten; a
        request it cannot frame ends the connection."""
        reader = client.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                chain: list[bytes] = []
                kept: list[bytes] = []
                for line in head[1:-1]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == self.header:
                        chain.append(value.strip())
                        continue
                    kept.append(line)
                if self.mode == "set":
                    chain = []
                chain.append(address.encode())
                kept.append(self.header_name + b": " + b", ".join(chain) + b"\r\n")
                upstream.sendall(b"".join([head[0], *kept, head[-1]]))
                _relay_body(reader, upstream, head)
        except (OSError, ValueError):
            pass
        finally:
            _shut(client, upstream)

    @staticmethod
    def _buffer_each_answer(upstream: socket.socket, client: socket.socket) -> None:
        """Upstream to client, each answer held until it is complete, then sent in one go."""
        reader = upstream.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                parts: list[bytes] = []
                _relay_body(reader, _Collect(parts), head, until_close=True)
                client.sendall(b"".join(head) + b"".join(parts))
        except (OSError, ValueError):
            pass
        finally:
            _shut(upstream, client)

    def close(self) -> None:
        self.closed = True
        # shutdown() wakes the thread blocked in accept(); close() alone would not on Linux,
        # and the "closed" endpoint would go on accepting connections.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        _shut(*connections)
        for connection in connections:
            connection.close()  # in-process (a test's own Pipe), nothing else would


def tls_from_environment() -> ssl.SSLContext | None:
    """A server context from FAKE_AGENT_TLS_CERT and FAKE_AGENT_TLS_KEY (PEM files), so a
    fake agent's public side speaks HTTPS like the real service; None without them."""
    cert, key = os.environ.get("FAKE_AGENT_TLS_CERT"), os.environ.get("FAKE_AGENT_TLS_KEY")
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class _Sink(Protocol):
    def sendall(self, data: bytes, /) -> None: ...


class _Collect:
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def sendall(self, data: bytes, /) -> None:
        self.parts.append(data)


def _read_head(reader: io.BufferedReader) -> list[bytes] | None:
    head: list[bytes] = []
    while True:
        line = reader.readline(HEAD_LIMIT)
        if not line:
            return None
        head.append(line)
        if line in (b"\r\n", b"\n"):
            return head


def _relay_body(
    reader: io.BufferedReader, sink: _Sink, head: list[bytes], *, until_close: bool = False
) -> None:
    status = head[0].split()[1:2]
    if until_close and status and (status[0].startswith(b"1") or status[0] in (b"204", b"304")):
        return  # an answer that never has a body, whatever its headers say
    length: int | None = None
    chunked = False
    for line in head[1:-1]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip() or 0)
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        _relay_chunks(reader, sink)
    elif length:
        _relay_exactly(reader, sink, length)
    elif length is None and until_close:
        # An answer framed by closing the connection.
        while True:
            data = reader.read1(65536)
            if not data:
                return
            sink.sendall(data)


def _relay_exactly(reader: io.BufferedReader, sink: _Sink, length: int) -> None:
    while length:
        data = reader.read(min(length, 65536))
        if not data:
            raise OSError("the peer went away mid-body")
        sink.sendall(data)
        length -= len(data)


def _relay_chunks(reader: io.BufferedReader, sink: _Sink) -> None:
    while True:
        size_line = reader.readline(HEAD_LIMIT)
        if not size_line:
            raise OSError("the peer went away mid-body")
        sink.sendall(size_line)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the blank line
                line = reader.readline(HEAD_LIMIT)
                sink.sendall(line)
                if line in (b"\r\n", b"\n", b""):
                    return
        _relay_exactly(reader, sink, size + 2)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _shut(source, sink)


def _shut(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
