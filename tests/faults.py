"""Ways to break the real processes: pause, partition, churn, and what a process costs meanwhile."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import requests
from testbed import BASE_IMAGE, DockerEngine


@contextlib.contextmanager
def paused(pid: int):
    """SIGSTOP a process for the duration of the block: it holds its sockets and answers nothing."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class Pauser:
    """Pauses a process for `pause` seconds out of every `period`, until stopped."""

    def __init__(self, pid: int, pause: float = 1.0, period: float = 3.0):
        self.pid, self.pause, self.period = pid, pause, period
        self.pauses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period - self.pause):
            with paused(self.pid):
                self.pauses += 1
                time.sleep(self.pause)

    def __enter__(self) -> Pauser:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Partition:
    """A TCP proxy on loopback whose link can be cut: while cut, bytes are dropped both ways,
    as by a network partition (requests time out; nothing is refused)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._open |= {downstream, upstream}
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._cut.is_set():  # during a partition, bytes are lost on the way
                    sink.sendall(data)
        for end in (source, sink):
            self._close(end)

    def _close(self, end: socket.socket) -> None:
        with self._lock:
            self._open.discard(end)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        """Restore the link. Connections that lost bytes are broken for good, as they would be
        after a real partition: they are reset, and new ones go through."""
        with self._lock:
            broken = list(self._open)
        for end in broken:
            self._close(end)
        self._cut.clear()

    def close(self) -> None:
        self._listener.close()
        self.heal()


class Churn:
    """Starts and kills containers at random from a background thread, until stopped.

    Each container publishes port 80 on a random host port. Errors are counted, not raised: the
    churn goes on while dockerd restarts. `started` lists every container id it created.
    """

    def __init__(self, engine: DockerEngine, total: int, keep: int = 10, seed: int = 1,
                 extra: tuple[str, ...] = ()):
        self.engine = engine
        self.total = total  # containers to create, then the churn only kills and stops
        self.keep = keep  # about how many to keep running
        self.extra = extra
        self.random = random.Random(seed)
        self.started: list[str] = []
        self.running: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.started) < self.total:
            try:
                if self.running and (len(self.running) >= self.keep or self.random.random() < 0.35):
                    victim = self.running.pop(self.random.randrange(len(self.running)))
                    verb = self.random.choice(("kill", "stop", "rm"))
                    args = {"kill": ("kill",), "stop": ("stop", "-t", "0"), "rm": ("rm", "-f")}[verb]
                    self.engine.docker(*args, victim, timeout=60)
                else:
                    cid = self.engine.out("run", "-d", "-p", "80", *self.extra, BASE_IMAGE)
                    self.started.append(cid)
                    self.running.append(cid)
            except Exception:
                self.errors += 1
                self._stop.wait(0.2)

    def start(self) -> Churn:
        self._thread.start()
        return self

    def wait(self, timeout: float = 300) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class _HttpProxy:
    """A threaded HTTP server of a fault tool, serving in the background until closed."""

    def _serve(self, server: socketserver.BaseServer) -> None:
        self._server = server
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OddDocker(_HttpProxy):
    """Docker's API on a unix socket of its own, forwarded to the real engine, except that the
    inspect data of chosen containers is rewritten: how an older or buggy engine might report
    them (an engine with odd data cannot be had here otherwise)."""

    def __init__(self, engine: DockerEngine, path: Path, rewrite: Callable[[dict], None] = lambda data: None):
        api = docker.APIClient(base_url=engine.host, version="auto")
        proxy = self
        # With close_events set, every event subscription is answered and closed at once, as by a
        # proxy that drops long requests or a daemon shutting down; event_requests counts them.
        self.close_events = False
        self.event_requests = 0
        self.open_streams = 0  # event streams passed through and open now

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if "/events" in self.path:
                    proxy.event_requests += 1
                    if proxy.close_events:
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        self.wfile.write(b"0\r\n\r\n")
                        return
                upstream = api.get(f"http+docker://localhost{self.path}", stream=True, timeout=None)
                if re.fullmatch(r"(/v[0-9.]+)?/containers/[0-9a-f]+/json", self.path.split("?")[0]) \
                        and upstream.status_code == 200:
                    data = upstream.json()
                    rewrite(data)
                    self._send(upstream.status_code, json.dumps(data).encode())
                elif "/events" in self.path:
                    self.send_response(upstream.status_code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    proxy.open_streams += 1
                    with contextlib.suppress(OSError), contextlib.ExitStack() as closing:
                        closing.callback(lambda: setattr(proxy, "open_streams", proxy.open_streams - 1))
                        for chunk in upstream.raw.read_chunked(decode_content=False):
                            if proxy.close_events:  # a stream open since before: it ends here
                                self.close_connection = True
                                upstream.close()
                                return
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                else:
                    self._send(upstream.status_code, upstream.content,
                               upstream.headers.get("Content-Type", "application/json"))

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.path = path
        self._serve(socketserver.ThreadingUnixStreamServer(str(path), Handler))

    @property
    def host(self) -> str:
        return f"unix://{self.path}"


class RefusingEtcd(_HttpProxy):
    """etcd's HTTP API on a loopback port of its own, forwarded to a real etcd, except that while
    `refuse` holds a key, every PUT of exactly that key is answered as etcd answers a client
    without permission (HTTP 403, error code 110): what a role without write access looks like."""

    def __init__(self, upstream: str):
        proxy = self
        self.refuse: str | None = None
        self.refused = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if self.command == "PUT" and proxy.refuse and path == f"/v2/keys{proxy.refuse}":
                    proxy.refused += 1
                    self._send(403, json.dumps({"errorCode": 110, "message": "The request requires user "
                                                "authentication", "cause": "Insufficient credentials",
                                                "index": 0}).encode())
                    return
                answer = requests.request(self.command, upstream + self.path, data=body, timeout=10,
                                          headers={"Content-Type": self.headers.get("Content-Type", "")})
                self._send(answer.status_code, answer.content, answer.headers)

            def _send(self, status: int, body: bytes, headers=None) -> None:
                self.send_response(status)
                for name in ("Content-Type", "X-Etcd-Index", "X-Etcd-Cluster-Id", "X-Raft-Index",
                             "X-Raft-Term"):
                    if headers is not None and name in headers:
                        self.send_header(name, headers[name])
                if headers is None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = do_POST = _forward

        self._serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))
        self.port = self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"
