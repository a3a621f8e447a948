"""The health signal: GET /healthz and `register.py healthcheck`, on a real registrar driven into
each unhealthy state (Docker stopped, etcd stopped, etcd never up) and back; its limits checked
exactly on the pure report with a clock of the test's own."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import testbed
from invariant import assert_log_is_clean
from testbed import HOST, REGISTER, health, wait_for_health, wait_until

import register

# No module-wide marker: the report's tests and the healthcheck client's are pure (fast tier); the
# others start a registrar, whose fixtures depend on the test bed's (tests/conftest.py).


# -- the report's limits, exactly (a clock of the test's own; plain objects for its inputs) -------

def report_at(now: float, *, connected=True, answered=None, reconciled=None, ttl=60, resync=30,
              error=None, docker_waiting=None, blocked=None):
    config = register.load_config([], {"ETCD_ENDPOINT": "127.0.0.1:2379", "HOST_IP": HOST,
                                       "REGISTER_TTL": str(ttl), "REGISTER_RESYNC": str(resync)})
    status = register.Status()
    status.update(events_connected=connected, reconciled_at=reconciled, last_error=error, records=2,
                  blocked=blocked)
    registry = SimpleNamespace(answered_at=answered)
    engine = SimpleNamespace(waiting_since=lambda: docker_waiting)
    return register.Health(config, status, registry, engine, clock=lambda: now).report()


def test_healthy_at_the_limits_and_unhealthy_past_them():
    # etcd within max(TTL, RESYNC) = 60 s plus one request's 5 s; the full reconcile within
    # 2 x RESYNC = 60 s
    assert report_at(1000.0, answered=935.0, reconciled=940.0) == (True, {
        "status": "ok", "host_ip": HOST, "etcd_api": 2, "docker_events": "connected",
        "etcd_answered_seconds_ago": 65.0, "full_reconcile_seconds_ago": 60.0, "records": 2})
    assert report_at(1000.0, answered=934.8, reconciled=939.8, error="etcd at http://x failed: boom") == (
        False, {"status": "unhealthy",
                "reasons": ["etcd last answered 65.2 s ago (limit 65 s)",
                            "the last full reconcile succeeded 60.2 s ago (limit 60 s)"],
                "last_error": "etcd at http://x failed: boom",
                "host_ip": HOST, "etcd_api": 2, "docker_events": "connected",
                "etcd_answered_seconds_ago": 65.2, "full_reconcile_seconds_ago": 60.2, "records": 2})


def test_the_etcd_limit_follows_the_longer_of_ttl_and_resync():
    assert report_at(100.0, answered=100.0 - 95, reconciled=99.0, ttl=90, resync=10)[0] is True
    assert report_at(100.0, answered=100.0 - 96, reconciled=99.0, ttl=90, resync=10)[1]["reasons"] == [
        "etcd last answered 96.0 s ago (limit 95 s)"]
    # TTL 0: the resync alone
    assert report_at(100.0, answered=100.0 - 16, reconciled=99.0, ttl=0, resync=10)[1]["reasons"] == [
        "etcd last answered 16.0 s ago (limit 15 s)"]


def test_a_docker_request_that_hangs_is_a_reason():
    assert report_at(100.0, answered=99.0, reconciled=99.0, docker_waiting=95.0)[0] is True
    assert report_at(100.0, answered=99.0, reconciled=99.0, docker_waiting=94.5)[1]["reasons"] == [
        "a request to Docker has been waiting 5.5 s"]


def test_a_registry_that_answers_and_refuses_is_unhealthy_at_once():
    """etcd answers (within its limit), the last full reconcile is recent, and still nothing can
    be written: a permission taken away, another engine on this HOST_IP."""
    cause = ("etcd refused a request for '/registered/10.0.0.1/x': etcdserver: permission denied (gRPC "
             "code 7); the role of etcd user 'registrar' (registrar) needs readwrite on /registered/")
    healthy, body = report_at(100.0, answered=99.0, reconciled=98.0, blocked=cause, error=cause)
    assert (healthy, body["reasons"], body["last_error"]) == (
        False, [f"blocked until an operator acts: {cause}"], cause)


def test_before_anything_happened():
    healthy, body = report_at(5.0, connected=False)
    assert healthy is False
    assert body["reasons"] == ["Docker's event stream is not connected", "etcd has not answered yet",
                               "no full reconcile has succeeded yet"]
    assert (body["docker_events"], body["etcd_answered_seconds_ago"], body["full_reconcile_seconds_ago"]) == (
        "disconnected", None, None)


# -- a real registrar ------------------------------------------------------------------------------



def healthcheck(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REGISTER), "healthcheck"], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin",
                                           "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}"})


def start_with_health(start, **settings):
    port = testbed.free_port()
    registrar = start(args=("--health-addr", f"127.0.0.1:{port}"), env={"LOG_FORMAT": "json"}, **settings)
    registrar.wait_for_event("health_server", url=f"http://127.0.0.1:{port}/healthz")
    return registrar, port, f"http://127.0.0.1:{port}/healthz"




def test_healthy_then_docker_stopped_then_back(docker, registrar, prefix, api):
    docker.out("run", "-d", "--restart", "always", "-p", "80", testbed.BASE_IMAGE)
    r, port, url = start_with_health(registrar, ttl=6, resync=2)
    body = wait_for_health(url, 200, 30, r, interval=0.1)
    assert body["status"] == "ok" and "reasons" not in body
    assert (body["host_ip"], body["etcd_api"], body["docker_events"], body["records"]) == (
        HOST, api, "connected", 1)
    assert 0 <= body["etcd_answered_seconds_ago"] <= 6 and 0 <= body["full_reconcile_seconds_ago"] <= 4
    checked = healthcheck(port)
    assert (checked.returncode, checked.stderr) == (0, "")
    assert checked.stdout.startswith("healthy: Docker's events followed, etcd answered ")
    assert checked.stdout.endswith(" s ago, 1 record(s)\n")
    # other paths and HEAD
    assert requests.get(url.replace("/healthz", "/"), timeout=5).status_code == 404
    assert requests.head(url, timeout=5).status_code == 200

    docker.stop_daemon()
    stopped = time.monotonic()
    body = wait_for_health(url, 503, 10, r, interval=0.1)
    said_after = time.monotonic() - stopped
    assert body["reasons"][0] == "Docker's event stream is not connected"
    assert body["docker_events"] == "disconnected"
    assert said_after < 5
    checked = healthcheck(port)
    assert checked.returncode == 1
    assert checked.stdout.startswith("unhealthy (HTTP 503): Docker's event stream is not connected")
    # no full reconcile without Docker: past 2 x RESYNC that is said too
    wait_until(lambda: any(reason.startswith("the last full reconcile succeeded ")
                           for reason in health(url)[1].get("reasons", [])), 10, "the reconcile reason")

    docker.start_daemon()
    body = wait_for_health(url, 200, 30, r, interval=0.1)
    assert body["docker_events"] == "connected" and body["records"] == 1
    assert healthcheck(port).returncode == 0


def test_unhealthy_while_etcd_is_stopped_then_healthy_again(docker, registrar, prefix, own_etcd):
    docker.out("run", "-d", "-p", "80", testbed.BASE_IMAGE)
    r, port, url = start_with_health(registrar, ttl=3, resync=1, endpoint=own_etcd.endpoint)
    wait_for_health(url, 200, 30, r, interval=0.1)
    own_etcd.stop()
    stopped = time.monotonic()
    # the full reconcile fails at once; its limit is 2 x RESYNC = 2 s, etcd's max(TTL, RESYNC) + 5 s
    # = 8 s
    wait_until(lambda: len(health(url)[1].get("reasons", [])) == 2, 20, "both etcd reasons")
    status, body = health(url)
    assert status == 503
    assert [reason.split(" succeeded ")[0].split(" answered ")[0] for reason in body["reasons"]] == [
        "etcd last", "the last full reconcile"]
    assert body["reasons"][0].endswith(" s ago (limit 8 s)")
    assert body["reasons"][1].endswith(" s ago (limit 2 s)")
    assert body["last_error"].startswith(f"etcd at {own_etcd.url} failed: ")
    assert body["docker_events"] == "connected"
    assert time.monotonic() - stopped < 20
    checked = healthcheck(port)
    assert checked.returncode == 1
    assert checked.stdout.startswith("unhealthy (HTTP 503): etcd last answered ")

    own_etcd.start()
    body = wait_for_health(url, 200, 30, r, interval=0.1)
    assert body["records"] == 1
    assert healthcheck(port).returncode == 0


def test_unhealthy_until_etcd_first_answers(docker, registrar, prefix):
    r, port, url = start_with_health(registrar, endpoint=f"127.0.0.1:{testbed.free_port()}")
    r.wait_for_event("retry", cause=lambda cause: cause.startswith("etcd at http://127.0.0.1:"))
    r.wait_for_event("connected")
    status, body = health(url)
    assert status == 503
    assert body["reasons"] == ["etcd has not answered yet", "no full reconcile has succeeded yet"]
    assert body["last_error"].startswith("etcd at http://127.0.0.1:")
    assert (body["etcd_answered_seconds_ago"], body["full_reconcile_seconds_ago"], body["records"]) == (
        None, None, 0)
    checked = healthcheck(port)
    assert (checked.returncode, checked.stdout) == (
        1, "unhealthy (HTTP 503): etcd has not answered yet; no full reconcile has succeeded yet\n")


def test_a_stuck_client_does_not_block_the_health_server(docker, registrar, prefix):
    import socket
    r, port, url = start_with_health(registrar)
    wait_for_health(url, 200, 30, r, interval=0.1)
    with socket.create_connection(("127.0.0.1", port)) as idle:  # says nothing
        idle.sendall(b"GET /hea")
        started = time.monotonic()
        assert health(url)[0] == 200
        assert time.monotonic() - started < 2


def test_the_health_json_is_one_short_line(docker, registrar, prefix):
    r, _, url = start_with_health(registrar)
    wait_for_health(url, 200, 30, r, interval=0.1)
    text = requests.get(url, timeout=5).text
    assert text.endswith("}\n") and text.count("\n") == 1 and len(text) < 300
    assert json.loads(text)["status"] == "ok"


# -- the healthcheck client against servers that misbehave (a socket server of the test's own) ----

ANSWERS = {
    "a list, not an object": b'HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\n["ok"]',
    "not HTTP": b"HELLO THERE\r\n\r\n",
    "cut short": b'HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n{"status":',
    "a redirect": b"HTTP/1.0 302 Found\r\nLocation: http://127.0.0.1:1/healthz\r\nContent-Length: 0\r\n\r\n",
    "a 70 kB header": b"HTTP/1.0 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "JSON nested 100,000 deep": b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"[" * 100_000,
}


class OddServer:
    """Answers every connection with `answer` (bytes), or drips headers a second apart, or
    streams a body without end."""

    def __init__(self, answer):
        import socket
        import threading
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(connection,), daemon=True).start()

    def _one(self, connection):
        with connection:
            try:
                connection.recv(65536)
                if self.answer == "drip":
                    connection.sendall(b"HTTP/1.0 200 OK\r\n")
                    for _ in range(20):
                        connection.sendall(b"X-A: b\r\n")
                        time.sleep(1)
                elif self.answer == "endless":
                    connection.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
                    while True:
                        connection.sendall(b"A" * 65536)
                else:
                    connection.sendall(self.answer)
            except OSError:
                pass

    def close(self):
        self.socket.close()


@pytest.mark.parametrize("what", [*ANSWERS, "headers a second apart", "a body without end"])
def test_healthcheck_says_one_line_whatever_the_server_answers(what):
    server = OddServer({"headers a second apart": "drip", "a body without end": "endless"}.get(
        what, ANSWERS.get(what)))
    try:
        started = time.monotonic()
        checked = healthcheck(server.port)
        took = time.monotonic() - started
    finally:
        server.close()
    assert (checked.returncode, checked.stderr) == (1, "")
    assert checked.stdout.count("\n") == 1 and checked.stdout.startswith("unhealthy")
    assert len(checked.stdout) < 400
    assert took < 3 + 2  # 3 s in all, whatever the server does (plus the interpreter's start)
    if what == "headers a second apart":
        assert checked.stdout == (f"unhealthy: no answer from http://127.0.0.1:{server.port}/healthz "
                                  "within 3 s\n")
    if what == "a redirect":
        assert checked.stdout == "unhealthy (HTTP 302): ''\n"  # not followed


def threads_of(registrar) -> int:
    status = Path(f"/proc/{registrar.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_clients_that_say_nothing_cannot_pile_up_threads_nor_hold_the_server(docker, registrar, prefix):
    import socket
    r, port, url = start_with_health(registrar)
    wait_for_health(url, 200, 30, r, interval=0.1)
    before = threads_of(r)
    idle = []
    try:
        for _ in range(60):  # connect, send half a request, never finish it
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
            idle.append(connection)
        time.sleep(0.5)
        assert threads_of(r) <= before + 16  # at most 16 clients served at once; the rest closed
        # each is shut within 5 s of its connection, so the health signal answers again soon after
        wait_until(lambda: _answers(url), 10, "/healthz to answer beside the idle clients")
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: threads_of(r) <= before, 10, "the health server's threads to end")
    # clients that reset their connection mid-answer leave no traceback in the service's output
    for _ in range(10):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        connection.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        connection.close()
    time.sleep(0.5)
    assert _answers(url)
    # nothing but the JSON log's lines (socketserver prints its "Exception occurred" and a traceback
    # raw), and none carries a traceback
    assert [line for line in r.log.splitlines() if not line.startswith("{")] == [], r.log[-2000:]
    assert not [e for e in r.entries() if "traceback" in e], r.log[-2000:]


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_docker_that_hangs_is_named(docker, registrar, prefix):
    import signal
    r, _, url = start_with_health(registrar, ttl=60, resync=1)
    wait_for_health(url, 200, 30, r, interval=0.1)
    docker.process.send_signal(signal.SIGSTOP)  # dockerd frozen: requests hang, the stream stays open
    try:
        body = wait_for_health(url, 503, 20, r, interval=0.1)
        wait_until(lambda: any(reason.startswith("a request to Docker has been waiting ")
                               for reason in health(url)[1].get("reasons", [])), 15, "the Docker reason")
        body = health(url)[1]
        assert body["docker_events"] == "connected"
    finally:
        docker.process.send_signal(signal.SIGCONT)
    wait_for_health(url, 200, 40, r, interval=0.1)


def test_a_health_server_at_its_client_cap_says_it_is_busy(docker, registrar, prefix):
    """16 clients that say nothing hold every slot (HealthServer.MAX_CLIENTS) until their 5 s are
    up; a probe meanwhile gets an answer that says why, not a closed connection."""
    import socket
    r, port, url = start_with_health(registrar)
    wait_for_health(url, 200, 30, r, interval=0.1)
    idle = []
    try:
        held = time.monotonic()
        for _ in range(register.HealthServer.MAX_CLIENTS):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
            idle.append(connection)
        # the server accepts connections in the order they came: the probe's is the 17th
        time.sleep(0.2)
        checked = subprocess.run([sys.executable, str(REGISTER), "healthcheck", "--health-addr",
                                  f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin"})
        # the idle clients still held their slots when the probe was answered (each is shut 5 s
        # after its connection)
        assert time.monotonic() - held < 5
    finally:
        for connection in idle:
            connection.close()
    assert (checked.returncode, checked.stderr) == (1, ""), checked
    assert checked.stdout.count("\n") == 1 and checked.stdout.endswith("\n"), checked.stdout
    assert checked.stdout.startswith("unhealthy (HTTP 503): the health server is busy"), checked.stdout
    wait_until(lambda: _answers(url), 10, "/healthz to answer once the idle clients are gone")
    assert healthcheck(port).returncode == 0
    assert_log_is_clean(r)
