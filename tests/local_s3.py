"""A real S3-compatible server on 127.0.0.1 for the tests: moto's standalone server behind a TCP relay.

Clients reach it the way users reach S3 everywhere, through the standard AWS environment variables
(``AWS_ENDPOINT_URL``, credentials, region: ``ENVIRONMENT``), which conftest sets before Ray starts so that every
Ray worker and every driver subprocess inherits them. The relay lets a test take the endpoint away and bring it
back: ``stop`` refuses new connections and cuts the open ones, as a server that went down or a lost network would;
``start`` serves again. The objects live in moto behind the relay, so they are still there when it comes back
(moto keeps them in memory: a restarted moto process would come back empty).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT = free_port()  # the endpoint clients are given, reserved when conftest is imported
ENVIRONMENT = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # no credentials or config from this machine's home directory: the tests talk to the local server only
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class LocalS3:
    """moto on a private port, relayed from ``PORT``; ``stop()`` and ``start()`` take the endpoint away and back."""

    def __init__(self):
        self.backend = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.backend)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_up(f"http://127.0.0.1:{self.backend}")
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.start()

    @property
    def endpoint(self) -> str:
        return ENVIRONMENT["AWS_ENDPOINT_URL"]

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", PORT))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.stop()
        self.process.kill()
        self.process.wait(timeout=10)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.backend))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._connections.discard(source)

    @staticmethod
    def _wait_until_up(url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                return
            except urllib.error.HTTPError:  # it answered
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not answer at {url} within {timeout}s") from None
                time.sleep(0.1)
