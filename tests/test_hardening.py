"""Hardening: hostile settings, hostile etcd contents, hostile Docker state, on the real processes.

Each test drives register.py (a subprocess) against the suite's dockerd and a real etcd into one
case, then checks the outcome in etcd (exact keys and bytes), the exit code and the log. The
settings refused at start are in test_config.py (every one runs the real process too); here are
those whose proof needs etcd or Docker: nothing written when a prefix would lead outside, an engine
that is merely down is waited for, what an odd HOST_IP or etcd host name does.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import etcd
import pytest
import requests
from faults import OddDocker, RefusingEtcd, rss_kib
from invariant import Invariant, assert_log_is_clean, expected_value, log_line
from test_service import IMAGE, converge, host_port, rec, val
from testbed import BASE_IMAGE, HOST, REGISTER, free_port, read_tree, wait_until

import register

# etcd v2 mechanics (directories, python-etcd requests, v2 error codes): the v3 adapter's part of these
# guarantees is in test_contract.py (scope, exact deletes of odd keys, refusal isolation)
pytestmark = [pytest.mark.integration, pytest.mark.v2_only]


def start(engine, *args: str) -> str:
    return engine.out("run", "-d", *args, BASE_IMAGE)


def log_lines(log: str, level: str, text: str = "") -> list[str]:
    """The messages of the log lines (text or JSON format) of one level that contain `text`."""
    return [said[1] for said in map(log_line, log.splitlines())
            if said and said[0] == level and text in said[1]]


JSON = {"LOG_FORMAT": "json"}  # a registrar whose log says what happened as events with fields


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "segment"), [("/registered/../elsewhere", ".."), ("/.", "."),
                                                 ("/registered/./x", ".")])
def test_a_prefix_that_leads_outside_is_refused_and_nothing_is_written(engine, own_etcd, prefix, segment):
    client = own_etcd.client()
    before = client.read("/").etcd_index
    result = subprocess.run(
        [sys.executable, str(REGISTER)], capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], "ETCD_ENDPOINT": own_etcd.endpoint, "HOST_IP": HOST,
             "REGISTER_PREFIX": prefix, "DOCKER_HOST": engine.host})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"register.py: error: REGISTER_PREFIX={prefix!r} has a {segment!r} segment, which etcd would "
        "resolve to another path; expected an absolute etcd path below the root, of letters, digits and "
        ". _ : @ - between slashes, e.g. REGISTER_PREFIX=/registered\n")
    assert client.read("/").etcd_index == before  # not one write anywhere


def test_every_change_goes_through_the_host_scope_and_nothing_outside_passes(own_etcd):
    """The one place: every write, refresh and delete names its key through HostScope.check, and
    the key checked is the key sent; keys outside this host's subtree never reach etcd."""
    client = own_etcd.client()
    neighbours = {"/scope/10.99.0.11/img:latest/" + "a" * 64: "neighbour", "/elsewhere/x": "other",
                  "/scope-other/10.99.0.1/x": "other prefix"}
    for key, value in neighbours.items():
        client.write(key, value)
    config = register.load_config([], {"ETCD_ENDPOINT": own_etcd.endpoint, "HOST_IP": "10.99.0.1",
                                       "REGISTER_PREFIX": "/scope", "REGISTER_TTL": "30"})
    registry = register.EtcdRegistry(config)
    registry.engine_id = "ENGINE:SCOPE:1"
    checked, sent = [], []
    scope_check = registry.scope.check

    def check(key, host_dir=False, found=False):
        result = scope_check(key, host_dir, found)
        checked.append(result)  # the key as it goes into the request's URL
        return result

    registry.scope.check = check
    connection = registry._connection

    def spying_connection():
        real = connection()
        for name in ("write", "delete"):
            method = getattr(type(real), name)
            setattr(real, name, lambda key, *args, _m=method, _c=real, **kwargs:
                    (sent.append(key), _m(_c, key, *args, **kwargs))[1])
        return real

    registry._connection = spying_connection
    refresh_request = registry._refresh_request  # the heartbeat's own PUT (with its own timeout)

    def spying_refresh(real, key, timeout):
        sent.append(key)
        return refresh_request(real, key, timeout)

    registry._refresh_request = spying_refresh
    record = "/scope/10.99.0.1/img:latest/" + "b" * 64
    assert registry.prepare() is True
    assert registry.heartbeat(2.0) is None
    registry.put(record, "[]")
    done = []
    registry.apply([record], [], lambda key, refusal: done.append((key, refusal)))  # and prunes
    assert done == [(record, None)]
    client.write(record + "/in-the-way", "x")  # a directory at the record's key: replaced
    registry.put(record, "[]")
    registry.delete_tree(record.rsplit("/", 1)[0])
    client.delete("/scope/10.99.0.1", recursive=True, dir=True)
    client.write("/scope/10.99.0.1", "a plain value", ttl=30)
    assert registry.heartbeat(2.0) == "host directory /scope/10.99.0.1 had been replaced by a plain value"
    assert registry.prepare() is True  # replaced by the directory, and claimed again
    # keys an operator put there with characters a URL reads otherwise: deleted exactly, escaped
    odd = ["/scope/10.99.0.1/a b", "/scope/10.99.0.1/a?recursive=true", "/scope/10.99.0.1/caf\u00e9#1"]
    for key in [*odd, "/scope/10.99.0.1/a", "/scope/10.99.0.1/keep"]:
        response = requests.put(f"{own_etcd.url}/v2/keys{urllib.parse.quote(key)}", data={"value": "x"},
                                timeout=5)
        assert response.status_code == 201, response.text
    for key in odd:
        registry.delete(key)
    assert sorted(read_tree(client, "/scope/10.99.0.1")) == ["/scope/10.99.0.1/a", "/scope/10.99.0.1/keep"]
    registry.clear()
    assert sent == checked and len(sent) >= 15

    outside = ["/scope/10.99.0.1/../../elsewhere/x", "/scope/10.99.0.1/./x", "/scope/10.99.0.1/a//b",
               "/scope/10.99.0.11/img:latest/" + "a" * 64, "/scope/10.99.0.1", "/scope", "/",
               "/elsewhere/x"]
    for key in outside:
        for operation in (lambda k: registry.put(k, "x"), registry.delete, registry.delete_tree):
            with pytest.raises(register.OutsideScope, match=r"^refusing to change '.*': not a clean key "
                                                            r"inside /scope/10\.99\.0\.1/$"):
                operation(key)
    for key in [*odd, "/scope/10.99.0.1/%2e%2e/x"]:  # this service writes no such key
        with pytest.raises(register.OutsideScope):
            registry.put(key, "x")
    for key in outside[:4] + outside[5:]:
        with pytest.raises(register.OutsideScope):
            registry.prune(key)
    assert sent == checked[:len(sent)]  # nothing more reached etcd
    for key, value in neighbours.items():
        assert client.read(key).value == value


def test_a_docker_engine_that_is_merely_down_is_waited_for(registrar):
    port = free_port()  # nothing listens there
    r = registrar(docker_host=f"tcp://127.0.0.1:{port}", env=JSON)
    r.wait_for_event("retry", count=3, timeout=30,
                     cause=f"Docker at tcp://127.0.0.1:{port} failed: connection refused")
    assert r.process.poll() is None
    retries = log_lines(r.log, "warning", "waiting for Docker")
    assert all(re.fullmatch(rf"waiting for Docker: Docker at tcp://127\.0\.0\.1:{port} failed: "
                            r"connection refused; retrying in [0-9.]+ s", line) for line in retries), retries


def test_a_loopback_or_ipv4_mapped_host_ip(docker, client, registrar, prefix):
    cid = start(docker, "-p", "80")
    r = registrar(host="127.0.0.1", env=JSON)
    converge(client, prefix, {
        f"{prefix}/127.0.0.1/{IMAGE}/{cid}": val(rec(cid, "127.0.0.1", host_port(docker, cid), 80))}, r)
    assert log_lines(r.log, "warning") == [
        "HOST_IP 127.0.0.1 is a loopback address: no other host can reach the ports registered under it "
        "(fine for a single-host demo)"]
    assert [e["event"] for e in r.entries() if e["level"] == "warning"] == ["host_ip"]
    r.kill()
    client.delete(f"{prefix}/127.0.0.1")
    mapped = registrar(host="::ffff:10.99.0.1", env=JSON)  # the IPv4 form, whatever the interpreter prints
    expected = {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, host_port(docker, cid), 80))}
    converge(client, prefix, expected, mapped)
    assert not mapped.events("host_ip") and not [e for e in mapped.entries() if e["level"] == "warning"]


def test_an_etcd_host_name_with_underscores_as_compose_names_it(docker, client, registrar, prefix, workdir,
                                                               etcd_server):
    hosts = workdir / "hosts-compose"
    hosts.write_text(Path("/etc/hosts").read_text() + "\n127.0.0.1 project_etcd_1\n")
    # register.py alone sees the name, through an /etc/hosts of its own mount namespace
    wrapper = ("unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$@"', "sh")
    cid = start(docker, "-p", "80")
    r = registrar(endpoint=f"project_etcd_1:{etcd_server.client_port}", wrapper=wrapper)
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, host_port(docker, cid), 80))}, r)
    assert f"etcd http://project_etcd_1:{etcd_server.client_port} (v2 API), subtree" in r.log


# -- etcd contents that someone else put there ------------------------------------------------

def test_a_plain_value_at_the_host_directory_is_replaced_at_start_and_at_run_time(docker, own_etcd,
                                                                                   registrar, prefix):
    client = own_etcd.client()
    host_dir = f"{prefix}/{HOST}"
    start(docker, "-p", "80")
    client.write(host_dir, "someone's value")
    r = registrar(endpoint=own_etcd.endpoint, ttl=6)  # refreshed every 2 s
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    check.wait(20, r)
    assert log_lines(r.log, "warning", host_dir) == [
        f"replaced the plain value at {host_dir}, where this host's directory belongs; re-registering "
        "everything"]
    # At run time, a plain value with a TTL of its own: etcd refreshes it as if it were the directory.
    for _ in range(5):  # the registrar may re-create the directory between the two requests
        try:
            client.delete(host_dir, recursive=True, dir=True)
            client.write(host_dir, "again", ttl=30)
            break
        except (etcd.EtcdNotFile, etcd.EtcdKeyNotFound):
            continue
    check.wait(20, r)
    later = start(docker, "-p", "80")  # and the writes work again
    check.wait(10, r)
    replaced = (f"replaced the plain value at {host_dir}, where this host's directory belongs; "
                "re-registering everything")
    assert log_lines(r.log, "warning", host_dir) == [replaced, replaced]  # at start, at run time
    assert "registered " in r.log.split(replaced)[2]
    assert later[:12] in r.log
    assert_log_is_clean(r)


@pytest.mark.parametrize(("level", "ttl"), [("prefix", 60), ("above the prefix", 0)])
def test_a_plain_value_at_or_above_the_prefix_waits_for_an_operator(docker, own_etcd, registrar, prefix,
                                                                    level, ttl):
    client = own_etcd.client()
    blocker = prefix if level == "prefix" else prefix.rsplit("/", 1)[0]
    client.write(blocker, "an operator's value")
    index = client.read(blocker).modifiedIndex
    start(docker, "-p", "80")
    r = registrar(endpoint=own_etcd.endpoint, ttl=ttl, env=JSON)
    message = (f"etcd: {blocker} holds a plain value, so nothing can be registered under {prefix}/{HOST}/; "
               "it is not this registrar's to delete: an operator should remove it "
               f"(etcdctl rm {blocker}) or choose another REGISTER_PREFIX")
    r.wait_for_event("retry", count=3, timeout=30, cause=message)  # three retries naming the blocking key
    assert r.process.poll() is None
    errors = log_lines(r.log, "error")  # said once a minute; each retry in between at debug level
    assert len(errors) == 1 and re.fullmatch(re.escape(message) + r"; \d+ container\(s\) pending; retrying "
                                             r"in [0-9.]+ s", errors[0]), errors
    assert (client.read(blocker).value, client.read(blocker).modifiedIndex) == ("an operator's value", index)
    client.delete(blocker)  # the operator acts
    check = Invariant(docker, own_etcd.store(), prefix, HOST, ttl=bool(ttl))
    check.wait(30, r)
    assert "Traceback" not in r.log


def test_etcd_refusing_the_host_directory_is_one_error_until_an_operator_grants_it(docker, own_etcd,
                                                                                 registrar, prefix):
    proxy = RefusingEtcd(own_etcd.url)  # answers like etcd for a role without write access
    proxy.refuse = f"{prefix}/{HOST}"
    try:
        start(docker, "-p", "80")
        r = registrar(endpoint=proxy.endpoint, env=JSON)
        wait_until(lambda: proxy.refused >= 3, 30, "three refused attempts")
        message = (f"etcd refused a request for '{prefix}/{HOST}': The request requires user authentication "
                   ": Insufficient credentials (HTTP 403); an operator should check what etcd lets this "
                   f"client do under {prefix}/ (permissions, limits)")
        errors = log_lines(r.log, "error")  # said once a minute, each retry in between at debug level
        assert len(errors) == 1 and re.fullmatch(re.escape(message) + r"; \d+ container\(s\) pending; "
                                                 r"retrying in [0-9.]+ s", errors[0]), errors
        # the proxy counts a refusal before the registrar has read it and logged its retry
        r.wait_for_event("retry", count=3, timeout=10, cause=message)  # three refusals in the log
        assert r.process.poll() is None
        proxy.refuse = None  # the operator grants the role
        Invariant(docker, own_etcd.store(), prefix, HOST).wait(30, r)
        assert "Traceback" not in r.log
    finally:
        proxy.close()


def test_unknown_keys_and_directories_in_the_host_directory_are_removed(docker, own_etcd, registrar, prefix):
    client = own_etcd.client()
    host_dir = f"{prefix}/{HOST}"
    cid = start(docker, "-p", "80")

    def put_junk():
        for odd in ("foo bar", "caf\u00e9/x", "line\nbreak"):  # keys a URL would read otherwise
            response = requests.put(f"{own_etcd.url}/v2/keys{urllib.parse.quote(f'{host_dir}/{odd}')}",
                                    data={"value": "x"}, timeout=5)
            assert response.status_code == 201, response.text
        client.write(f"{host_dir}/stray", "x")
        client.write(f"{host_dir}/an-empty-directory", None, dir=True)
        client.write(f"{host_dir}/{IMAGE}/not-a-container-id", "x")
        client.write(f"{host_dir}/other::image:1/sub/deeper/leaf", "x")
        client.write(f"{host_dir}/{IMAGE}/{'f' * 64}/nested", "x")  # a directory at a record's key

    def directories():
        top = client.read(host_dir, recursive=True)
        return {node.key for node in top.get_subtree() if node.dir}

    client.write(host_dir, None, dir=True, ttl=60)
    put_junk()  # found at start
    r = registrar(endpoint=own_etcd.endpoint, resync=2)
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    check.wait(20, r)
    assert directories() == {host_dir, f"{host_dir}/{IMAGE}"}
    assert f"removed stale key {host_dir}/stray: no such running container" in r.log
    assert f"removed stale key '{host_dir}/line\\nbreak': no such running container" in r.log
    put_junk()  # and put there while it runs: the next resync removes it
    check.wait(10, r)
    wait_until(lambda: directories() == {host_dir, f"{host_dir}/{IMAGE}"}, 10, "junk directories removed")
    expected = {f"{host_dir}/{IMAGE}/{cid}": expected_value(docker.inspect(cid), HOST)}
    assert read_tree(client, host_dir) == expected
    assert_log_is_clean(r)


# -- one bad container never blocks the others ------------------------------------------------

def test_a_container_with_odd_shaped_data_holds_back_no_other(docker, client, registrar, prefix, workdir):
    def rewrite(data: dict) -> None:
        if data.get("Name") == "/odd-shape":
            data["State"] = "running"  # a string where Docker has a mapping

    proxy = OddDocker(docker, workdir / "odd-shape.sock", rewrite)
    try:
        r = registrar(docker_host=proxy.host, env=JSON)
        r.wait_for_event("reconciled")
        odd = docker.out("run", "-d", "--name", "odd-shape", "--network", "host", BASE_IMAGE, "httpd", "-f",
                         "-p", "127.0.0.1:18096")  # host mode: always inspected
        good = start(docker, "--name", "good", "-p", "80")
        converge(client, f"{prefix}/{HOST}", {
            f"{prefix}/{HOST}/{IMAGE}/{good}": val(rec(good, HOST, host_port(docker, good), 80))}, r,
            timeout=5)
        assert log_lines(r.log, "warning", "odd-shape") == [
            f"container odd-shape ({odd[:12]}) treated as publishing nothing: Docker reported data of an "
            "unexpected shape (AttributeError: \"'str' object has no attribute 'get'\")"]
        assert_log_is_clean(r)
    finally:
        proxy.close()


def test_a_record_over_the_size_limit_is_not_registered_and_holds_back_nothing(docker, client, registrar,
                                                                              prefix):
    keep = start(docker, "--name", "keep", "-p", "80")
    leaving = start(docker, "--name", "leaving", "-p", "80")
    r = registrar(resync=2)
    check = Invariant(docker, client, prefix, HOST)
    check.wait(20, r)
    big = docker.out("run", "-d", "--name", "big", "--network", "host", "--expose", "1-30000",
                     BASE_IMAGE, "httpd", "-f", "-p", "127.0.0.1:18098")
    size = len(expected_value(docker.inspect(big), HOST))  # what the oracle would write
    assert size > 512 * 1024
    docker.docker("kill", leaving)
    check.wait(10, r)
    assert read_tree(client, f"{prefix}/{HOST}") == {
        f"{prefix}/{HOST}/{IMAGE}/{keep}": expected_value(docker.inspect(keep), HOST)}
    peak = 0
    for _ in range(6):  # three resyncs or more, each inspecting the big container again
        peak = max(peak, rss_kib(r.process.pid))
        time.sleep(1)
    assert log_lines(r.log, "warning", "big") == [
        f"container big ({big[:12]}) not registered: its record would take {size} bytes for 30000 published "
        "port(s), over REGISTER_MAX_RECORD_BYTES=524288"]
    assert peak < 100 * 1024, f"register.py's RSS reached {peak} KiB"
    assert_log_is_clean(r)


def test_a_record_etcd_refuses_is_retried_alone_and_removals_and_writes_go_on(docker, client, registrar,
                                                                              prefix):
    keep = start(docker, "--name", "keep", "-p", "80")
    leaving = start(docker, "--name", "leaving", "-p", "80")
    # a limit above etcd's own: its request limit refuses the record ("POST too large")
    r = registrar(resync=2, env={"REGISTER_MAX_RECORD_BYTES": str(64 << 20), **JSON})
    check = Invariant(docker, client, prefix, HOST)
    check.wait(20, r)
    huge = docker.out("run", "-d", "--name", "huge", "--network", "host", "--expose", "1-65535",
                      "--expose", "1-65535/udp", BASE_IMAGE, "httpd", "-f", "-p", "127.0.0.1:18099")
    refused = (f"could not register huge ({huge[:12]}) image regtest/busybox:1: etcd refused it: Invalid "
               "POST form : http: POST too large (HTTP 400); retrying this container alone in ")
    said = r.wait_for_event("refused", timeout=60, container="huge", id=huge[:12])
    assert said[0]["message"].startswith(refused), said
    docker.docker("kill", leaving)
    newcomer = start(docker, "--name", "newcomer", "-p", "80")
    huge_key = f"{prefix}/{HOST}/{IMAGE}/{huge}"
    expected = {f"{prefix}/{HOST}/{IMAGE}/{cid}": expected_value(docker.inspect(cid), HOST)
                for cid in (keep, newcomer)}
    converge(client, f"{prefix}/{HOST}", expected, r, timeout=30)
    # a resync that leaves the refused record to its own retry (the reason is in the message only)
    r.wait_for_event("reconciled", timeout=20, records=3, written=0, removed=0, refused=1,
                     message=lambda message: message.startswith(
                         "full reconcile (periodic resync): 3 record(s), 0 written, 0 removed, 2 already "
                         "right, 1 refused by etcd and retried alone"))
    assert read_tree(client, f"{prefix}/{HOST}") == expected and huge_key not in expected
    refusals = [e["level"] for e in r.events("refused", container="huge")]  # said once, retried quietly
    assert refusals.count("warning") == 1 and set(refusals) <= {"warning", "debug"}, refusals
    assert len(log_lines(r.log, "warning", "could not register huge")) == 1  # and no other warning of it
    assert_log_is_clean(r)


# -- Docker state -----------------------------------------------------------------------------

def test_an_event_stream_that_closes_at_once_is_retried_with_backoff(docker, client, registrar, prefix,
                                                                     workdir):
    proxy = OddDocker(docker, workdir / "closing-events.sock")
    proxy.close_events = True
    try:
        cid = start(docker, "-p", "80")
        r = registrar(docker_host=proxy.host, env=JSON)
        r.wait_for_event("connected")
        cpu, begun = cpu_seconds(r.process.pid), proxy.event_requests
        time.sleep(10)
        subscriptions, cpu = proxy.event_requests - begun, cpu_seconds(r.process.pid) - cpu
        assert subscriptions <= 15, f"{subscriptions} subscriptions in 10 s"  # was about 1,500
        assert cpu < 2.5, f"{cpu:.2f} s of CPU in 10 s"
        delays = [e["retry_in"] for e in r.events("disconnected", cause="the stream was closed by Docker")
                  if "retry_in" in e]  # a stream that closed at once: its reconnection is delayed
        caps = [0.5, 1, 2, 4, 8, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
        assert len(delays) >= 3 and all(d <= cap for d, cap in zip(delays, caps)), delays
        # Docker answers every subscription: each brings a full reconcile, so the records are right
        key = f"{prefix}/{HOST}/{IMAGE}/{cid}"
        converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, host_port(docker, cid), 80))}, r)
        assert not r.events("refresh_suspended")

        proxy.close_events = False  # healthy again: events flow
        wait_until(lambda: proxy.open_streams == 1, 20, "an event stream that stays open")
        second = start(docker, "-p", "80")
        converge(client, f"{prefix}/{HOST}", {
            key: val(rec(cid, HOST, host_port(docker, cid), 80)),
            f"{prefix}/{HOST}/{IMAGE}/{second}": val(rec(second, HOST, host_port(docker, second), 80))}, r,
            timeout=5)
        time.sleep(register.MIN_STREAM_SECONDS + 1)
        mark = len(r.log)
        proxy.close_events = True  # a stream that lived: its end resets the backoff
        docker.docker("kill", second)  # an event, so that the proxy ends the stream now
        def lost_since() -> list[dict]:
            return [e for e in r.entries(mark) if e.get("event") == "disconnected"]
        wait_until(lambda: [e for e in lost_since() if "retry_in" in e], 20, "a stream closed at once")
        after = lost_since()
        assert [e for e in after if "retry_in" not in e], after  # the stream that lived: no delay
        first = next(e for e in after if "retry_in" in e)
        assert first["retry_in"] <= 0.5, after  # the first step of the schedule again
        assert_log_is_clean(r)
    finally:
        proxy.close()


def test_network_disconnect_and_connect_change_the_records_within_an_event(docker, client, registrar, prefix):
    r = registrar(env=JSON)  # resync every 60 s: what changes within seconds came from the events
    cid = start(docker, "--name", "netweb", "-p", "80")
    key = f"{prefix}/{HOST}/{IMAGE}/{cid}"
    first_port = host_port(docker, cid)
    converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, first_port, 80))}, r)
    began = time.monotonic()
    try:
        docker.docker("network", "disconnect", "bridge", cid)  # no network: nothing published
        converge(client, f"{prefix}/{HOST}", {}, r, timeout=5)
        # logged just after the delete that etcd already shows
        said = r.wait_for_event("removed", timeout=5, container="netweb", id=cid[:12])
        assert [e["message"] for e in said] == [f"removed netweb ({cid[:12]}) image regtest/busybox:1 ports "
                                                f"80/tcp={HOST}:{first_port}: container no longer runs or "
                                                "publishes a port"]
        docker.docker("network", "connect", "bridge", cid)  # published again, on a new host port
        second_port = host_port(docker, cid)
        assert second_port != first_port
        converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, second_port, 80))}, r, timeout=5)
        docker.docker("network", "create", "regtest-second")
        docker.docker("network", "connect", "regtest-second", cid)
        docker.docker("network", "disconnect", "bridge", cid)  # the other network takes the port over
        third_port = host_port(docker, cid)
        assert third_port not in (first_port, second_port)
        converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, third_port, 80))}, r, timeout=5)
        assert time.monotonic() - began < 50
        assert len(r.events("reconciled")) == 1  # the one at start: no resync, every change an event
        assert f"updated netweb ({cid[:12]}) image regtest/busybox:1 ports 80/tcp={HOST}:{third_port}" \
            in r.log
    finally:
        docker.docker("rm", "-f", cid)
        docker.docker("network", "rm", "regtest-second", check=False)
    assert_log_is_clean(r)


def test_json_logs_of_a_refused_setting_and_of_a_run_hold_no_secret(engine, etcd_server):
    """Credentials are refused before anything is logged, in either format; a run's JSON log shows
    the addresses it was given, which hold none."""
    env = {"PATH": os.environ["PATH"], "ETCD_ENDPOINT": f"http://root:s3cret@{etcd_server.endpoint}",
           "HOST_IP": HOST, "LOG_FORMAT": "json", "DOCKER_HOST": "tcp://admin:s3cret@127.0.0.1:2376"}
    result = subprocess.run([sys.executable, str(REGISTER)], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "s3cret" not in result.stderr + result.stdout
    assert result.stderr.startswith("register.py: error: ETCD_ENDPOINT='http://***@127.0.0.1:")
    env.update(ETCD_ENDPOINT=etcd_server.endpoint, DOCKER_HOST=engine.host, REGISTER_PREFIX="/json-secret")
    process = subprocess.Popen([sys.executable, str(REGISTER)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(process.stderr.readline())
        assert first["event"] == "starting" and "s3cret" not in json.dumps(first)
    finally:
        process.kill()
        process.wait()
