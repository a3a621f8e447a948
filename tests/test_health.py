"""The health signal: GET /healthz and `register.py healthcheck`, on a real registrar driven into
each unhealthy state (Docker stopped, etcd stopped, etcd never up) and back; its limits checked
exactly on the pure report with a clock of the test's own."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import requests
import testbed
from testbed import HOST, REGISTER, wait_until

import register

pytestmark = pytest.mark.integration


# -- the report's limits, exactly (a clock of the test's own; plain objects for its inputs) -------

def report_at(now: float, *, connected=True, answered=None, reconciled=None, ttl=60, resync=30,
              error=None):
    config = register.load_config([], {"ETCD_ENDPOINT": "127.0.0.1:2379", "HOST_IP": HOST,
                                       "REGISTER_TTL": str(ttl), "REGISTER_RESYNC": str(resync)})
    reconciler = SimpleNamespace(events_connected=connected, reconciled_at=reconciled, last_error=error,
                                 known={"a": None, "b": None})
    registry = SimpleNamespace(answered_at=answered)
    return register.Health(config, reconciler, registry, clock=lambda: now).report()


def test_healthy_at_the_limits_and_unhealthy_past_them():
    # etcd within max(TTL, RESYNC) = 60 s, the full reconcile within 2 x RESYNC = 60 s
    assert report_at(1000.0, answered=940.0, reconciled=940.0) == (True, {
        "status": "ok", "host_ip": HOST, "etcd_api": 2, "docker_events": "connected",
        "etcd_answered_seconds_ago": 60.0, "full_reconcile_seconds_ago": 60.0, "records": 2})
    assert report_at(1000.0, answered=939.8, reconciled=939.8, error="etcd at http://x failed: boom") == (
        False, {"status": "unhealthy",
                "reasons": ["etcd last answered 60 s ago (limit 60 s)",
                            "the last full reconcile succeeded 60 s ago (limit 60 s)"],
                "last_error": "etcd at http://x failed: boom",
                "host_ip": HOST, "etcd_api": 2, "docker_events": "connected",
                "etcd_answered_seconds_ago": 60.2, "full_reconcile_seconds_ago": 60.2, "records": 2})


def test_the_etcd_limit_follows_the_longer_of_ttl_and_resync():
    assert report_at(100.0, answered=100.0 - 90, reconciled=99.0, ttl=90, resync=10)[0] is True
    assert report_at(100.0, answered=100.0 - 91, reconciled=99.0, ttl=90, resync=10)[1]["reasons"] == [
        "etcd last answered 91 s ago (limit 90 s)"]
    # TTL 0: the resync alone
    assert report_at(100.0, answered=100.0 - 11, reconciled=99.0, ttl=0, resync=10)[1]["reasons"] == [
        "etcd last answered 11 s ago (limit 10 s)"]


def test_before_anything_happened():
    healthy, body = report_at(5.0, connected=False)
    assert healthy is False
    assert body["reasons"] == ["Docker's event stream is not connected", "etcd has not answered yet",
                               "no full reconcile has succeeded yet"]
    assert (body["docker_events"], body["etcd_answered_seconds_ago"], body["full_reconcile_seconds_ago"]) == (
        "disconnected", None, None)


# -- a real registrar ------------------------------------------------------------------------------

def health(url: str) -> tuple[int, dict]:
    answer = requests.get(url, timeout=5)
    assert answer.headers["Content-Type"] == "application/json"
    return answer.status_code, answer.json()


def healthcheck(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REGISTER), "healthcheck"], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin",
                                           "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}"})


def start_with_health(start, **settings):
    port = testbed.free_port()
    registrar = start(args=("--health-addr", f"127.0.0.1:{port}"), **settings)
    registrar.wait_for_log(f"health signal at http://127.0.0.1:{port}/healthz")
    return registrar, port, f"http://127.0.0.1:{port}/healthz"


def wait_for_status(url: str, status: int, timeout: float, registrar) -> dict:
    seen = {}

    def reached():
        seen["last"] = health(url)
        return seen["last"][0] == status
    try:
        wait_until(reached, timeout, f"/healthz to answer {status}", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last answer {seen.get('last')}\n{registrar.log[-3000:]}") from None
    return seen["last"][1]


def test_healthy_then_docker_stopped_then_back(docker, registrar, prefix, api):
    docker.out("run", "-d", "--restart", "always", "-p", "80", testbed.BASE_IMAGE)
    r, port, url = start_with_health(registrar, ttl=6, resync=2)
    body = wait_for_status(url, 200, 30, r)
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
    body = wait_for_status(url, 503, 10, r)
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
    body = wait_for_status(url, 200, 30, r)
    assert body["docker_events"] == "connected" and body["records"] == 1
    assert healthcheck(port).returncode == 0


def test_unhealthy_while_etcd_is_stopped_then_healthy_again(docker, registrar, prefix, own_etcd):
    docker.out("run", "-d", "-p", "80", testbed.BASE_IMAGE)
    r, port, url = start_with_health(registrar, ttl=3, resync=1, endpoint=own_etcd.endpoint)
    wait_for_status(url, 200, 30, r)
    own_etcd.stop()
    stopped = time.monotonic()
    # the full reconcile fails at once; its limit is 2 x RESYNC = 2 s, etcd's max(TTL, RESYNC) = 3 s
    wait_until(lambda: len(health(url)[1].get("reasons", [])) == 2, 15, "both etcd reasons")
    status, body = health(url)
    assert status == 503
    assert [reason.split(" succeeded ")[0].split(" answered ")[0] for reason in body["reasons"]] == [
        "etcd last", "the last full reconcile"]
    assert body["reasons"][0].endswith(" s ago (limit 3 s)")
    assert body["reasons"][1].endswith(" s ago (limit 2 s)")
    assert body["last_error"].startswith(f"etcd at {own_etcd.url} failed: ")
    assert body["docker_events"] == "connected"
    assert time.monotonic() - stopped < 15
    checked = healthcheck(port)
    assert checked.returncode == 1
    assert checked.stdout.startswith("unhealthy (HTTP 503): etcd last answered ")

    own_etcd.start()
    body = wait_for_status(url, 200, 30, r)
    assert body["records"] == 1
    assert healthcheck(port).returncode == 0


def test_unhealthy_until_etcd_first_answers(docker, registrar, prefix):
    r, port, url = start_with_health(registrar, endpoint=f"127.0.0.1:{testbed.free_port()}")
    r.wait_for_log("retrying in")
    r.wait_for_log("connected to Docker at ")
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
    wait_for_status(url, 200, 30, r)
    with socket.create_connection(("127.0.0.1", port)) as idle:  # says nothing
        idle.sendall(b"GET /hea")
        started = time.monotonic()
        assert health(url)[0] == 200
        assert time.monotonic() - started < 2


def test_the_health_json_is_one_short_line(docker, registrar, prefix):
    r, _, url = start_with_health(registrar)
    wait_for_status(url, 200, 30, r)
    text = requests.get(url, timeout=5).text
    assert text.endswith("}\n") and text.count("\n") == 1 and len(text) < 300
    assert json.loads(text)["status"] == "ok"
