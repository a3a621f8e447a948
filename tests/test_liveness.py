"""The liveness of a host's records: the heartbeat, a lost lease, other keys on the lease.

register.py runs as a subprocess against a real dockerd and a real etcd of the test's own, with
LOG_FORMAT=json, so that the log's events and fields can be asserted exactly; what did or did not
happen is read from etcd itself:

- one silent endpoint of ETCD_ENDPOINT (a proxy that accepts and answers nothing) does not lose the
  lease (v3) or the host directory's TTL (v2): the heartbeat moves to the next endpoint in time;
- etcd paused past the TTL: the lost lease is said once, naming the old and the new lease;
- keys of others on this registrar's lease are never taken: not after a hiccup (the lease is
  kept, no record is written again), not by --deregister-on-exit;
- ETCD_API=2 with a TTL against etcd 3.5, which cannot refresh a v2 directory's TTL
  (etcd-io/etcd#13589), exits with code 2 before writing anything. (test_contract.py checks the
  adapter's error in process; this is the service's exit.)
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import signal
import time

import pytest
import testbed
from faults import Partition, paused
from invariant import NEXT_STEPS, assert_log_is_clean, diff, expected_registry
from store import Store, V3Store
from testbed import BASE_IMAGE, HOST, wait_until

pytestmark = pytest.mark.integration

_names = itertools.count(1)

# (etcd version, --enable-v2, ETCD_API): as the v2 and v3 flavours of tests/conftest.py
FLAVOURS = {"v2": ("3.4", True, 2), "v3": ("3.5", False, 3)}


@pytest.fixture
def server(workdir):
    """start(version, v2, api) -> a running etcd of the test's own, resumed and stopped at teardown."""
    started: list[testbed.EtcdServer] = []

    def start(version: str, v2: bool, api: int) -> testbed.EtcdServer:
        etcd = testbed.EtcdServer(workdir, name=f"liveness{next(_names)}-{version.replace('.', '')}",
                                  version=version, v2=v2, api=api)
        started.append(etcd)
        etcd.start()
        return etcd

    yield start
    for etcd in started:
        if etcd.process is not None and etcd.process.poll() is None:
            etcd.process.send_signal(signal.SIGCONT)
        etcd.stop()


def run(docker, *args: str) -> str:
    return docker.out("run", "-d", *args, BASE_IMAGE)


def json_log(r: testbed.Registrar) -> list[dict]:
    """The log's JSON lines (LOG_FORMAT=json), oldest first."""
    entries = []
    for line in r.log.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


def events(r: testbed.Registrar, name: str) -> list[dict]:
    return [entry for entry in json_log(r) if entry.get("event") == name]


def assert_clean(r: testbed.Registrar) -> None:
    """invariant.assert_log_is_clean, and its rule for the text format applied to the JSON lines:
    every warning or error says what happens next."""
    assert_log_is_clean(r)
    vague = [entry["message"] for entry in json_log(r) if entry.get("level") in ("warning", "error")
             and not any(step in entry.get("message", "") for step in NEXT_STEPS)]
    assert not vague, "log lines that do not say what happens next:\n" + "\n".join(vague)


def _text(data: str | None) -> str:
    return base64.b64decode(data or "").decode("utf-8", "surrogateescape")


def record_kvs(client: V3Store, host_key: str) -> dict[str, dict]:
    """key -> etcd's kv (value, lease, mod_revision...) of every record below `host_key`/."""
    start = host_key + "/"
    return {_text(kv["key"]): kv for kv in client.range(start, host_key + "0")}


def wait_registered(docker, client: Store, prefix: str, r: testbed.Registrar, count: int) -> dict[str, str]:
    """Until `<prefix>/<HOST>` holds exactly the records the running containers want, alive."""
    host_dir = f"{prefix}/{HOST}"
    expected = expected_registry(docker, prefix, HOST)
    assert len(expected) == count

    def registered() -> bool:
        if r.process.poll() is not None:
            raise AssertionError(f"register.py exited with {r.process.returncode}:\n{r.log[-6000:]}")
        return client.records(host_dir) == expected and (client.liveness(host_dir) or 0) > 0

    try:
        wait_until(registered, 30, f"the records under {host_dir}/", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{diff(expected, client.records(host_dir))}\n"
                             f"register.py log (end):\n{r.log[-6000:]}") from None
    return expected


# -- 1. one silent member --------------------------------------------------------------------

@pytest.mark.parametrize("flavour_name", list(FLAVOURS))
def test_one_silent_member_does_not_lose_the_lease(docker, own_registrar, prefix, server, flavour_name):
    """The endpoint in use stops answering (it accepts and holds connections): the heartbeat's
    attempt there is bounded, and the next one goes at once to the next endpoint, which reaches
    the same etcd. At no moment of 20 s is the host's liveness or a record missing; on v3 the lease
    is the same one throughout."""
    version, v2, api = FLAVOURS[flavour_name]
    etcd = server(version, v2, api)
    link = Partition(etcd.client_port)
    try:
        for _ in range(2):
            run(docker, "-p", "80")
        r = own_registrar(endpoint=f"{link.endpoint},{etcd.endpoint}", ttl=6, resync=5,
                          env={"ETCD_API": str(api), "LOG_FORMAT": "json"})
        client = etcd.store()
        host_dir = f"{prefix}/{HOST}"
        expected = wait_registered(docker, client, prefix, r, count=2)
        lease = client.lease_of(host_dir) if api == 3 else None
        assert api == 2 or lease
        silent, direct = f"http://{link.endpoint}", etcd.url

        link.cut()
        cut = time.monotonic()
        problems, polls = [], 0
        while (at := time.monotonic() - cut) < 20:
            liveness = client.liveness(host_dir)
            if liveness is None or liveness <= 0:
                problems.append(f"{at:5.1f} s: {host_dir} is missing or not alive (liveness {liveness})")
            records = client.records(host_dir)
            if records != expected:
                problems.append(f"{at:5.1f} s: the records changed:\n{diff(expected, records)}")
            if api == 3 and (now := client.lease_of(host_dir)) != lease:
                problems.append(f"{at:5.1f} s: {host_dir} is on lease {now:x}, not {lease:x}")
            polls += 1
            time.sleep(0.1)
        assert not problems, "\n".join(problems[:20]) + f"\nregister.py log (end):\n{r.log[-6000:]}"
        assert polls >= 60  # about 0.3 s per poll at worst on a busy machine: etcd was watched

        retries = [entry for entry in events(r, "heartbeat_retry") if entry.get("endpoint") == silent]
        assert retries, f"no heartbeat_retry at {silent}:\n{r.log[-6000:]}"
        retry = retries[0]
        assert retry["level"] == "warning" and retry["next"] == direct and retry["cause"]
        what = f"lease {lease:x} of {host_dir}" if api == 3 else f"host directory {host_dir}"
        assert re.match(rf"heartbeat of {re.escape(what)} failed at {re.escape(silent)}: .+; "
                        rf"retrying in [0-9.]+ s at {re.escape(direct)}", retry["message"]), retry["message"]
        assert events(r, "host_dir_lost") == []
        assert_clean(r)
    finally:
        link.close()


# -- 2. etcd paused past the TTL ---------------------------------------------------------------

def test_etcd_paused_past_the_ttl_the_lost_lease_is_said_once(docker, own_registrar, prefix, server):
    etcd = server("3.5", False, 3)
    for _ in range(2):
        run(docker, "-p", "80")
    r = own_registrar(endpoint=etcd.endpoint, ttl=6, resync=5, env={"ETCD_API": "3", "LOG_FORMAT": "json"})
    client = etcd.store()
    host_key = f"{prefix}/{HOST}"
    expected = wait_registered(docker, client, prefix, r, count=2)
    old = client.lease_of(host_key)
    assert old != 0

    with paused(etcd.process.pid):
        time.sleep(9)  # the lease (6 s) runs out while etcd is stopped; etcd revokes it on waking

    def on_a_new_lease() -> int:
        lease = client.lease_of(host_key)
        kvs = record_kvs(client, host_key)
        if lease in (0, old) or {key: _text(kv.get("value")) for key, kv in kvs.items()} != expected:
            return 0
        return lease if all(int(kv.get("lease", 0)) == lease for kv in kvs.values()) else 0

    try:
        new = wait_until(on_a_new_lease, 30, "every record on a new lease", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{r.log[-6000:]}") from None

    said = [entry for entry in json_log(r)
            if f"lease {old:x} of {host_key} had expired or been revoked" in entry.get("message", "")]
    assert len(said) == 1, said
    lost = said[0]
    assert (lost["event"], lost["level"]) == ("host_dir_lost", "warning")
    assert re.fullmatch(rf"lease {old:x} of {re.escape(host_key)} had expired or been revoked \(.+\); "
                        rf"re-registering everything on new lease {new:x}", lost["message"]), lost["message"]
    assert len(events(r, "host_dir_lost")) == 1
    granted = events(r, "lease_granted")  # the first grant only: the new lease is said by the warning
    assert [entry["message"] for entry in granted] == [
        f"granted lease {old:x} (6 s) for {host_key}; every record is written on it"]
    assert client.lease_of(host_key) == new
    assert {key: int(kv.get("lease", 0)) for key, kv in record_kvs(client, host_key).items()} == \
        dict.fromkeys(expected, new)
    assert_clean(r)


# -- 3. keys of others on our lease -------------------------------------------------------------

def test_keys_of_others_on_our_lease_are_never_taken(docker, own_registrar, prefix, server):
    """Someone attached keys of their own to this registrar's lease (outside its host's subtree).
    (a) After an etcd hiccup the registrar keeps that lease and writes no record again, and warns
    once, naming the keys; (b) --deregister-on-exit deletes this host's keys and leaves the others
    (the lease, left to expire, still carries them)."""
    etcd = server("3.5", False, 3)
    for _ in range(2):
        run(docker, "-p", "80")
    # TTL 15, heartbeat every 5 s. The hiccup must make a request fail for sure (then the registrar
    # checks its lease): a request waits 5 s for etcd, and with REGISTER_RESYNC=1 a read is sent
    # within 1 s of the pause, so a 7 s pause fails it; a 2 s pause would fail nothing. The lease
    # outlives the pause: the last keepalive before it was at most 5 s earlier.
    ttl = 15
    r = own_registrar(endpoint=etcd.endpoint, ttl=ttl, resync=1, args=("--deregister-on-exit",),
                      env={"ETCD_API": "3", "LOG_FORMAT": "json"})
    client = etcd.store()
    host_key = f"{prefix}/{HOST}"
    expected = wait_registered(docker, client, prefix, r, count=2)
    lease = client.lease_of(host_key)
    assert lease != 0
    other, neighbour = "/other/important", f"{prefix}/10.0.0.2/x"
    etcd.etcdctl("put", other, "precious", f"--lease={lease:x}")
    etcd.etcdctl("put", neighbour, "y", f"--lease={lease:x}")
    assert (client.lease_of(other), client.lease_of(neighbour)) == (lease, lease)
    revisions = {key: int(kv["mod_revision"]) for key, kv in record_kvs(client, host_key).items()}
    assert set(revisions) == set(expected)

    # (a) a hiccup shorter than the TTL
    with paused(etcd.process.pid):
        time.sleep(7)
    time.sleep(ttl / 3 + 3)
    felt = [entry for entry in json_log(r) if entry.get("event") in ("retry", "heartbeat_retry")]
    assert felt, f"no request failed during the pause: the test proves nothing\n{r.log[-6000:]}"
    assert client.lease_of(host_key) == lease, r.log[-6000:]
    kvs = record_kvs(client, host_key)
    assert {key: _text(kv.get("value")) for key, kv in kvs.items()} == expected
    assert {key: int(kv["mod_revision"]) for key, kv in kvs.items()} == revisions  # none written again
    assert {key: int(kv.get("lease", 0)) for key, kv in kvs.items()} == dict.fromkeys(expected, lease)
    assert (client.get(other), client.lease_of(other)) == ("precious", lease)
    assert (client.get(neighbour), client.lease_of(neighbour)) == ("y", lease)
    warned = events(r, "foreign_keys_on_lease")
    assert len(warned) == 1, warned or r.log[-6000:]
    assert warned[0]["level"] == "warning" and sorted(warned[0]["keys"]) == sorted([other, neighbour])

    # (b) SIGTERM with --deregister-on-exit
    r.process.send_signal(signal.SIGTERM)
    assert r.process.wait(3) == 0
    assert client.get(other) == "precious"
    assert client.get(neighbour) == "y"
    assert record_kvs(client, host_key) == {}
    assert client.kv(host_key) is None
    assert_clean(r)


# -- 4. etcd 3.5's v2 API with a TTL -------------------------------------------------------------

def test_v2_with_a_ttl_against_etcd_3_5_exits_2_before_writing_anything(
        docker, own_registrar, prefix, server):
    """etcd 3.5's v2 API cannot change a directory's TTL (etcd-io/etcd#13589). The registrar must
    say so and exit before it writes: not create the host directory and its records, then exit at
    the first refresh. (test_contract.py checks the adapter's error in process.)"""
    etcd = server("3.5", True, 2)
    run(docker, "-p", "80")
    r = own_registrar(endpoint=etcd.endpoint, ttl=6, env={"ETCD_API": "2"})
    try:
        wait_until(lambda: r.process.poll() is not None, 10, "register.py to exit", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{r.log[-6000:]}") from None
    assert r.process.returncode == 2, r.log[-6000:]
    last = r.log.splitlines()[-1]
    assert last.startswith("register.py: error: "), last
    assert "etcd-io/etcd#13589" in last and "ETCD_API=3" in last, last
    assert r.log.count("register.py: error: ") == 1
    answer = etcd.http().get(f"{etcd.url}/v2/keys{prefix}", timeout=5)
    assert answer.status_code == 404, f"{prefix} exists in etcd's v2 keyspace: {answer.text}"
    v3 = V3Store(etcd.url, session=etcd.http())
    assert v3.range(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)) == []
    assert_log_is_clean(r)
