"""Two Docker engines, one HOST_IP: who owns the address in etcd.

The suite's engine and a second real dockerd (its own namespace, data root and engine ID) run a
registrar each with the same HOST_IP against the suite's etcd, on both APIs. The one that finds the
address claimed by another live engine writes nothing, deletes nothing, says so once and is
unhealthy until the other leaves; then it takes over. A registrar restarted on the same engine, or
upgraded from the host key of today's format (no engine in it), adopts what is there and rewrites
no record. Everything is read back from etcd: exact keys, bytes and revisions.
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import signal
import time
from pathlib import Path

import etcd
import pytest
import testbed
from invariant import NEXT_STEPS, assert_log_is_clean
from testbed import BASE_IMAGE, HOST, Registrar, health, read_tree, wait_for_health, wait_until

import register

pytestmark = [pytest.mark.integration, pytest.mark.json_log]

IMAGE = "regtest::busybox:1"
BLOCKED = "blocked until an operator acts: "
CONFLICT = "claimed by two Docker engines"


# -- a second engine ----------------------------------------------------------------------------

class SecondEngine(testbed.DockerEngine):
    """A second dockerd. Docker before 23.0 (Debian's 20.10) takes its engine ID from the trust key
    /etc/docker/key.json, which every dockerd of a machine shares unless its configuration file
    names another ("deprecated-key-path"; there is no such flag): two engines of the test bed
    would then have the same ID. own_key() gives this one a key, so an ID, of its own."""

    config_file: Path | None = None

    def own_key(self) -> None:
        self.config_file = self.dir / "daemon.json"
        self.config_file.write_text(json.dumps({"deprecated-key-path": str(self.dir / "key.json")}))

    def _in_netns(self, *args: str) -> list[str]:
        if args[:1] == ("dockerd",) and self.config_file is not None:
            args = (*args, "--config-file", str(self.config_file))
        return super()._in_netns(*args)


def engine_id(docker_engine: testbed.DockerEngine) -> str:
    return docker_engine.out("info", "--format", "{{.ID}}")


@pytest.fixture(scope="module")
def second_engine(workdir, engine):
    """Started once for this module: about 0.3 s to start, 3 s to build the test image."""
    other = SecondEngine(workdir, name="second")
    try:
        other.start()
        if engine_id(other) == engine_id(engine):
            other.stop_daemon()
            other.own_key()
            other.start_daemon()
        other.build_images()
        yield other
    finally:
        other.stop()


@pytest.fixture
def docker2(second_engine):
    second_engine.remove_all_containers()
    yield second_engine
    second_engine.remove_all_containers()


@pytest.fixture
def ids(docker, docker2) -> tuple[str, str]:
    """(the suite's engine's ID, the second engine's ID): different."""
    first, second = engine_id(docker), engine_id(docker2)
    assert first and second and first != second, (first, second)
    return first, second


# -- records, the host's marker, what etcd holds ----------------------------------------------

def record(cid: str, public: int) -> str:
    """The exact value of a busybox container that publishes its port 80 on every address."""
    return (f'[{{"container":"{cid}","image":"{IMAGE}","ip":"{HOST}","public_port":"{public}",'
            '"private_port":"80","port_type":"tcp"}]')


def run(engine: testbed.DockerEngine, public: int) -> str:
    return engine.out("run", "-d", "-p", f"{public}:80", BASE_IMAGE)


def marker_key(client, host_dir: str) -> str:
    """Where the owner is written: v3 the host key, v2 the hidden key in the host directory."""
    return host_dir if client.api == 3 else f"{host_dir}/_registrar"


def owner_value(started: str, engine: str) -> str:
    return json.dumps({"registrar": register.VERSION, "started": started, "engine": engine},
                      separators=(",", ":"))


def assert_owned_by(client, host_dir: str, engine: str, ttl: int = 6) -> str:
    """The marker names `engine`, in the contract's exact bytes; the host's keys live on a TTL of
    `ttl` (v3: the host key's lease was granted `ttl` s). Returns the marker's value."""
    key = marker_key(client, host_dir)
    try:  # v2 may write it just after the host directory
        value = wait_until(lambda: client.get(key), 5, f"{key}", interval=0.1)
    except TimeoutError:
        raise AssertionError(f"{key} is missing; {host_dir}/ holds {state(client, host_dir)}") from None
    try:
        started = json.loads(value)["started"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{key} holds {value!r}") from None
    assert value == owner_value(started, engine), value
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", started), value
    if client.api == 3:
        left, granted = client.lease_ttl(client.lease_of(host_dir))
        assert granted == ttl and 0 < left <= ttl, (left, granted)
    else:
        assert key not in read_tree(client, host_dir)  # hidden: no listing shows it
        assert 0 < client.liveness(host_dir) <= ttl
    return value


def state(client, host_dir: str) -> dict:
    """Every record below the host directory and the owner's marker, with their revisions
    (v3 mod_revision and lease, read in one request; v2 modifiedIndex)."""
    if client.api == 3:
        found = {}
        for kv in client.range(host_dir, host_dir + "0"):  # the host key, then <host_dir>/...
            key = base64.b64decode(kv["key"]).decode()
            if key == host_dir or key.startswith(host_dir + "/"):
                found[key] = (base64.b64decode(kv.get("value", "")).decode(), int(kv["mod_revision"]),
                              int(kv.get("lease", 0)))
        return found
    found = {}
    for key in (host_dir, marker_key(client, host_dir)):
        try:
            top = client.client.read(key, recursive=True)
        except etcd.EtcdKeyNotFound:
            continue
        found.update({node.key: (node.value, node.modifiedIndex) for node in top.get_subtree()
                      if not node.dir})
    return found


def converge(client, host_dir: str, expected: dict, registrar: Registrar, timeout: float = 20) -> None:
    def done():
        return read_tree(client, host_dir) == expected
    try:
        wait_until(done, timeout, f"{host_dir}/ to hold {sorted(expected)}", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: it holds {read_tree(client, host_dir)}\n"
                             f"register.py log (end):\n{registrar.log[-5000:]}") from None


# -- the JSON log and the health signal --------------------------------------------------------

def entries(registrar: Registrar) -> list[dict]:
    """Every line of a LOG_FORMAT=json log, each one JSON object; none a traceback, and every
    warning or error says what happens next (invariant.assert_log_is_clean, for JSON)."""
    found = [json.loads(line) for line in registrar.log.splitlines()]
    assert all(isinstance(e, dict) and {"level", "message"} <= e.keys() for e in found), registrar.log
    assert not [e for e in found if "traceback" in e or "unexpected error" in e["message"]], registrar.log
    vague = [e["message"] for e in found if e["level"] in ("warning", "error")
             and not any(step in e["message"] for step in NEXT_STEPS)]
    assert not vague, "log lines that do not say what happens next:\n" + "\n".join(vague)
    return found


def start_second(registrar, docker2, env: dict | None = None) -> tuple[Registrar, str]:
    """Registrar B: the second engine, the same HOST_IP, REGISTER_RESYNC=2, a health signal."""
    port = testbed.free_port()
    second = registrar(ttl=6, resync=2, docker_host=docker2.host,
                       env={"LOG_FORMAT": "json", "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}", **(env or {})})
    url = f"http://127.0.0.1:{port}/healthz"
    second.wait_for_event("health_server", url=url)
    return second, url


# -- 1. the second engine writes nothing while the first lives, then takes over ----------------

def test_a_second_engine_with_the_same_host_ip_writes_nothing_until_the_first_leaves(
        docker, docker2, ids, client, registrar, prefix):
    first_id, second_id = ids
    host_dir = f"{prefix}/{HOST}"
    a_cid, b_cid = run(docker, 18201), run(docker2, 18202)
    a_key, b_key = f"{host_dir}/{IMAGE}/{a_cid}", f"{host_dir}/{IMAGE}/{b_cid}"
    a = registrar(ttl=6, args=("--deregister-on-exit",))
    converge(client, host_dir, {a_key: record(a_cid, 18201)}, a)
    a.wait_for_event("reconciled")
    with contextlib.suppress(TimeoutError):  # v2: the marker may follow the records; checked below
        wait_until(lambda: client.get(marker_key(client, host_dir)), 5, "A's marker", interval=0.1)
    before = state(client, host_dir)

    b, url = start_second(registrar, docker2)
    # three of B's resyncs: A's records and marker stay byte for byte at their revisions (v3 on
    # A's lease), and B's container gets no record
    watched_until = time.monotonic() + 3 * 2 + 1
    while time.monotonic() < watched_until:
        now = state(client, host_dir)
        assert now == before, (f"etcd changed under A:\nbefore {before}\nnow    {now}\n"
                               f"B's log:\n{b.log[-4000:]}")
        time.sleep(0.2)
    assert b.process.poll() is None, b.log

    found = entries(b)
    said = [e for e in found if e["level"] == "error"]
    conflict = (f"HOST_IP {HOST} is {CONFLICT}: this one ({second_id}) and {first_id}; ")
    assert len(said) == 1 and said[0]["message"].startswith(conflict), said
    assert (said[0].get("event"), said[0].get("address"), said[0].get("engine"), said[0].get("other")) == (
        "address_conflict", HOST, second_id, first_id), said[0]
    assert [e for e in found if e["level"] == "debug" and CONFLICT in e["message"]], "no retry since"
    status, body = health(url)
    reasons = [reason for reason in body.get("reasons", []) if reason.startswith(BLOCKED)]
    assert status == 503 and len(reasons) == 1, body
    assert reasons[0].startswith(BLOCKED + conflict.rstrip("; ")), reasons
    assert said[0]["message"].startswith(reasons[0][len(BLOCKED):]), (said[0], reasons)
    assert_owned_by(client, host_dir, first_id)

    assert a.stop(signal.SIGTERM) == 0  # --deregister-on-exit: A's keys go
    converge(client, host_dir, {b_key: record(b_cid, 18202)}, b, timeout=25)
    assert_owned_by(client, host_dir, second_id)
    wait_for_health(url, 200, 15, b)
    assert len([e for e in entries(b) if e["level"] == "error"]) == 1, b.log  # said once, still
    assert_log_is_clean(a)


# -- 2. a restart on the same engine -------------------------------------------------------------

def test_a_restart_on_the_same_engine_adopts_its_own_and_writes_nothing(docker, ids, client, registrar,
                                                                         prefix):
    """What test_service's test_a_restart_of_the_service_writes_nothing checks, with the engine
    in the marker: the restarted registrar finds its own engine there and rewrites nothing."""
    first_id, _ = ids
    host_dir = f"{prefix}/{HOST}"
    cids = [run(docker, 18211 + n) for n in range(2)]
    expected = {f"{host_dir}/{IMAGE}/{cid}": record(cid, 18211 + n) for n, cid in enumerate(cids)}
    first = registrar(ttl=6)
    converge(client, host_dir, expected, first)
    first.wait_for_event("reconciled")
    marker = assert_owned_by(client, host_dir, first_id)
    assert first.stop() == 0
    before, head = state(client, host_dir), client.head()

    second = registrar(ttl=6)
    second.wait_for_event("reconciled")
    assert "0 written, 0 removed, 2 already right" in second.log, second.log
    assert client.changes_since(prefix, head) == 0  # nothing under the prefix, marker included
    assert state(client, host_dir) == before
    assert assert_owned_by(client, host_dir, first_id) == marker
    if client.api == 3:
        assert f"adopted lease {client.lease_of(host_dir):x} of {host_dir}" in second.log
    assert not second.events("address_conflict")
    assert_log_is_clean(first)
    assert_log_is_clean(second)


# -- 3. the upgrade: a marker of today's format, without the engine ----------------------------

def test_an_upgrade_adopts_the_host_key_of_todays_format_and_rewrites_no_record(docker, ids, client,
                                                                                 registrar, prefix):
    """Written by hand as the registrar of today writes it: v3 the host key
    {"registrar":"1.0.0","started":...} on a lease of REGISTER_TTL seconds that holds it and the
    record; v2 the host directory with its TTL and the record, and no _registrar key."""
    first_id, _ = ids
    host_dir = f"{prefix}/{HOST}"
    cid = run(docker, 18221)
    key = f"{host_dir}/{IMAGE}/{cid}"
    if client.api == 3:
        lease = int(client.call("lease/grant", {"TTL": 6, "ID": 0})["ID"])
        client.put(host_dir, '{"registrar":"1.0.0","started":"2026-01-01T00:00:00Z"}', lease=lease)
        client.put(key, record(cid, 18221), lease=lease)
    else:
        lease = 0
        client.write(host_dir, None, dir=True, ttl=6)
        client.put(key, record(cid, 18221))
    revision = client.revision(key)

    r = registrar(ttl=6)
    r.wait_for_event("reconciled")
    assert "0 written, 0 removed, 1 already right" in r.log, r.log
    assert read_tree(client, host_dir) == {key: record(cid, 18221)}
    assert client.revision(key) == revision  # the record was not written again
    assert_owned_by(client, host_dir, first_id)
    if client.api == 3:
        assert client.lease_of(host_dir) == lease and client.lease_of(key) == lease
        assert f"adopted lease {lease:x} of {host_dir}" in r.log
        assert not r.events("lease_granted") and not r.events("host_dir_lost")  # no new lease
    assert not r.events("address_conflict")
    assert_log_is_clean(r)
