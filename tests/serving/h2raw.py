"""A raw-socket HTTP/2 client that opens gRPC streams and never sends their message: the
half-open requests an adversary can hold against a server (no HTTP/2 library, just frames)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x4, 0x6, 0x7
END_HEADERS, ACK = 0x4, 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman coding."""
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out += bytes([len(text)]) + text
    return out


def grpc_headers(path: str, authority: str) -> bytes:
    return b"".join(
        _hpack_literal(n, v)
        for n, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )


class StalledStreams:
    """One TCP connection holding ``streams`` gRPC calls open: HEADERS sent, DATA never.

    A reader thread answers the server's SETTINGS and PINGs, so the connection stays healthy
    and only the requests are stalled.
    """

    def __init__(self, host: str, port: int, path: str, streams: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
        self.opened = 0
        self.goaway = False
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        block = grpc_headers(path, f"{host}:{port}")
        for i in range(streams):
            self.sock.sendall(frame(HEADERS, END_HEADERS, 2 * i + 1, block))
            self.opened += 1

    def _read(self) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length:
                    break
                kind, flags = buf[3], buf[4]
                payload = buf[9 : 9 + length]
                buf = buf[9 + length :]
                try:
                    if kind == SETTINGS and not flags & ACK:
                        self.sock.sendall(frame(SETTINGS, ACK, 0))
                    elif kind == PING and not flags & ACK:
                        self.sock.sendall(frame(PING, ACK, 0, payload))
                    elif kind == GOAWAY:
                        self.goaway = True
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
