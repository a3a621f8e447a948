"""The registry seam's contract: both adapters, in process, against real etcd servers, and the
verified fake (tests/memory_registry.py) in memory, in the fast tier.

Every combination a user may run: v2 and v3 on Debian's etcd 3.4 and on etcd 3.5.1 (both started
with --enable-v2, so that one server per version serves both APIs; their keyspaces are separate).
What the reconciler relies on holds the same way whichever adapter is behind the seam: this
host's keys only, exact keys and bytes, deletes never held back by a refused put, liveness that
expires, is extended by one request and is adopted by a restart, and a clear that takes
everything.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import signal
import time
import urllib.parse

import etcd
import pytest
import requests
import store as stores
import testbed
from memory_registry import MemoryEtcd, MemoryRegistry, MemoryStore
from testbed import wait_until

import register

HOST = "10.99.0.1"
ENGINE = "ENGINE:CONTRACT:1"  # the Docker engine a registry speaks for (docker info: ID)
NEIGHBOUR = "10.99.0.11"  # a prefix of ours as text: never matched
_prefixes = itertools.count(1)
PORTS: dict[str, int] = {}  # etcd version -> client port of this module's server




def _etcd(version: str, workdir) -> testbed.EtcdServer:
    etcd = testbed.EtcdServer(workdir, name=f"contract{version.replace('.', '')}", version=version, v2=True)
    etcd.start()
    PORTS[version] = etcd.client_port
    return etcd


@pytest.fixture(scope="module")
def etcd34(workdir):
    etcd = _etcd("3.4", workdir)
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def etcd35(workdir):
    etcd = _etcd("3.5", workdir)
    yield etcd
    etcd.stop()


# (etcd version, API) of each backend; the memory one (tests/memory_registry.py) is the verified
# fake, and its tests are in the fast tier: no server, no root
BACKENDS = [pytest.param((version, api), id=f"v{api}-{version}", marks=pytest.mark.integration)
            for version in ("3.4", "3.5") for api in (2, 3)] + [pytest.param(("memory", 0), id="memory")]


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, int]:
    return request.param


@pytest.fixture
def server(backend, request) -> testbed.EtcdServer | None:
    """The etcd server of this backend; None for the memory one."""
    version, _ = backend
    return None if version == "memory" else request.getfixturevalue(f"etcd{version.replace('.', '')}")


@pytest.fixture
def api(backend) -> int:
    return backend[1]


@pytest.fixture
def memory(server) -> MemoryEtcd | None:
    return MemoryEtcd() if server is None else None


@pytest.fixture
def store(server, api, memory):
    if memory is not None:
        return MemoryStore(memory)
    return stores.V2Store(server.client()) if api == 2 else stores.V3Store(server.url)


@pytest.fixture
def make(server, api, memory):
    """make(ttl=30) -> a registry adapter for HOST under a prefix of this test's own."""
    prefix = f"/contract{next(_prefixes)}"

    def build(ttl: int = 30, host: str = HOST, engine: str = ENGINE) -> register.Registry:
        endpoint = server.endpoint if server else "127.0.0.1:2379"
        config = register.load_config([], {"ETCD_ENDPOINT": endpoint, "HOST_IP": host,
                                           "REGISTER_PREFIX": prefix, "REGISTER_TTL": str(ttl),
                                           "ETCD_API": str(api or 3)})
        registry = register.make_registry(config) if server else MemoryRegistry(config, memory)
        registry.engine_id = engine  # the reconciler asks Docker for it before the first prepare
        if api == 2 and ttl and server.version == "3.5":
            no_directory_ttl(registry)  # refused before anything is written: nothing more to check
        return registry

    build.prefix = prefix
    return build


def test_a_heartbeat_waits_at_most_what_it_is_given_then_hands_over_to_the_next_endpoint(server, make):
    if server is None:
        pytest.skip("a stalled etcd member and the endpoints' failover are etcd's, not the seam's")
    registry = make(ttl=3)
    registry.prepare()
    server.process.send_signal(signal.SIGSTOP)  # a member that holds writes, as one without a leader
    try:
        started = time.monotonic()
        with pytest.raises(register.HeartbeatFailed) as raised:
            registry.heartbeat(1.0)
        took = time.monotonic() - started
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert 0.9 <= took < 1.6  # the request timeout is 5 s
    url = f"http://127.0.0.1:{server.client_port}"
    assert (raised.value.endpoint, raised.value.next, raised.value.cause) == (url, url, "timed out")
    assert str(raised.value) == f"etcd at {url} failed: timed out"
    assert registry.heartbeat(1.0) is None  # the next one, once etcd answers, finds it in place


def record_key(registry: register.Registry, n: int, image: str = "regtest::busybox:1") -> str:
    return f"{registry.host_dir}/{image}/{n:064x}"


def no_directory_ttl(registry: register.Registry) -> None:
    """etcd 3.5's v2 API cannot change a directory's TTL (etcd-io/etcd#13589): the API check says
    so (the service exits, code 2) before anything is written; the test ends there."""
    with pytest.raises(register.ApiMismatch) as raised:
        registry.check_api()
    assert str(raised.value) == (
        f"etcd at http://127.0.0.1:{PORTS['3.5']} (etcd 3.5.1) cannot change a directory's TTL through its "
        "v2 API (etcd 3.5 answers \"Raft Internal Error: Not a file\", etcd-io/etcd#13589), so "
        f"{registry.host_dir} could not be kept alive; set ETCD_API=3 (--etcd-api 3), or REGISTER_TTL=0 "
        "to register without a TTL")
    pytest.skip("v2 with a TTL is refused on etcd 3.5 before any write (checked)")


def apply(registry, deletes=(), puts=(), keep=None) -> dict:
    done = {}
    registry.apply(list(deletes), list(puts), lambda key, refusal: done.setdefault(key, refusal), keep)
    return done


def test_prepare_puts_the_liveness_in_place_once(make, store):
    registry = make(ttl=30)
    assert registry.prepare() is True
    assert 0 < store.liveness(registry.host_dir) <= 30
    assert registry.prepare() is False  # nothing more to do: no request that writes
    assert store.records(registry.host_dir) == {}


def test_apply_writes_and_deletes_exact_keys_and_bytes(make, store):
    registry = make()
    registry.prepare()
    puts = [(record_key(registry, n), f'[{{"n":{n}}}]') for n in range(5)]
    done = apply(registry, puts=puts)
    assert done == {key: None for key, _ in puts}
    assert store.records(registry.host_dir) == dict(puts)
    assert registry.read().values == dict(puts)
    done = apply(registry, deletes=[puts[0][0], puts[1][0]])
    assert done == {puts[0][0]: None, puts[1][0]: None}
    assert store.records(registry.host_dir) == dict(puts[2:])


def test_the_api_probe_and_a_read_write_nothing_and_the_next_apply_repairs(make, store):
    """What `register.py check` does against a live registrar's keys (probe, read, plan, print):
    no lease granted, no directory made, no key touched, whatever the read finds wanting."""
    registry = make(ttl=30)
    registry.prepare()
    puts = [(record_key(registry, n), f'"{n}"') for n in range(3)]
    apply(registry, puts=puts)
    head = store.head()
    dry = make(ttl=30)  # a second reader of the same host, as a dry run is: never prepared
    dry.check_api()
    assert dry.read().values == dict(puts)
    assert registry.read() == register.Records(dict(puts), frozenset())
    assert store.head() == head
    if store.api == 2:
        return  # a v2 read that finds the directory gone raises HostLost, writing nothing (below)
    store.delete(registry.host_dir)  # an operator's etcdctl del of the host key
    head = store.head()
    assert registry.read().values == dict(puts) and dry.read().values == dict(puts)
    assert store.head() == head and store.get(registry.host_dir) is None
    apply(registry)  # the next apply puts it back first, guarded, then writes what it was given
    assert json.loads(store.get(registry.host_dir))["engine"] == ENGINE
    assert store.lease_of(registry.host_dir) == registry.lease
    assert store.records(registry.host_dir) == dict(puts)


def test_a_neighbour_whose_address_extends_ours_is_never_read_nor_touched(make, store):
    registry, neighbour = make(), make(host=NEIGHBOUR)
    neighbour.prepare()
    apply(neighbour, puts=[(record_key(neighbour, 1), "theirs")])
    registry.prepare()
    mine = record_key(registry, 2)
    apply(registry, puts=[(mine, "mine")])
    assert registry.read().values == {mine: "mine"}
    registry.clear()
    assert store.records(neighbour.host_dir) == {record_key(neighbour, 1): "theirs"}
    assert store.host_present(neighbour.host_dir)


def test_keys_outside_this_host_are_refused_before_any_request(make, store):
    registry = make()
    registry.prepare()
    outside = [f"{make.prefix}/{NEIGHBOUR}/x", f"{make.prefix}/x", "/elsewhere", registry.host_dir,
               f"{registry.host_dir}/../x", f"{registry.host_dir}/a//b"]
    for key in outside:
        with pytest.raises(register.OutsideScope):
            apply(registry, puts=[(key, "x")])
    for key in outside[:4]:
        with pytest.raises(register.OutsideScope):
            apply(registry, deletes=[key])
    assert store.get(f"{make.prefix}/x") is None and store.get("/elsewhere") is None


def test_found_keys_with_any_character_are_deleted_exactly(make, store):
    registry = make()
    registry.prepare()
    odd = [f"{registry.host_dir}/a b", f"{registry.host_dir}/caf\u00e9", f"{registry.host_dir}/x\ny"]
    keep = f"{registry.host_dir}/keep"
    if store.api == 2:
        store.client.write(keep, "x")
        for key in odd:  # python-etcd would put the key into the URL as it is: quote it here
            answer = requests.put(f"{store.client.base_uri}/v2/keys{urllib.parse.quote(key)}",
                                  data={"value": "x"}, timeout=5)
            assert answer.status_code == 201, answer.text
    else:  # v3 keys are bytes: one that is no UTF-8 at all, too
        odd.append(f"{registry.host_dir}/\udcff\udcfe/no-utf-8")
        for key in [*odd, keep]:
            store.put(key, "x")
    assert set(registry.read().values) == {*odd, keep}
    assert apply(registry, deletes=odd) == dict.fromkeys(odd)
    assert set(store.records(registry.host_dir)) == {keep}


def test_a_refused_put_holds_back_no_other_in_its_batch(make, store):
    """11 MiB is over every etcd's request limit (v2: the form limit; v3: the gRPC limit): etcd
    refuses that record, and only that one."""
    registry = make()
    registry.prepare()
    puts = [(record_key(registry, n), f'"{n}"') for n in range(150)]
    huge = (record_key(registry, 999), "x" * (11 * 1024 * 1024))
    puts.insert(70, huge)
    done = apply(registry, puts=puts)
    assert isinstance(done.pop(huge[0]), register.RecordRefused)
    assert done == {key: None for key, _ in puts if key != huge[0]}
    assert store.records(registry.host_dir) == {key: value for key, value in puts if key != huge[0]}


def test_heartbeat_extends_liveness_and_says_when_it_was_lost(make, store):
    registry = make(ttl=3)
    registry.prepare()
    lease = getattr(registry, "lease", None)
    apply(registry, puts=[(record_key(registry, 1), "one")])
    for _ in range(3):  # past the TTL: kept alive
        time.sleep(1)
        assert registry.heartbeat(1.0) is None
    assert store.records(registry.host_dir) == {record_key(registry, 1): "one"}
    wait_until(lambda: not store.host_present(registry.host_dir), 8, "the liveness to expire")
    assert store.records(registry.host_dir) == {}  # the records went with it
    lost = registry.heartbeat(1.0)
    if store.api == 2:
        expected = f"host directory {registry.host_dir} had expired or lost its TTL"
    else:  # the memory fake has no keepalive answer to quote
        expected = f"lease {lease:x} of {registry.host_dir} had expired or been revoked" + (
            " (its keepalive was answered with TTL 0)" if store.api == 3 else "")
    assert lost == expected
    assert registry.prepare() is True
    assert store.host_present(registry.host_dir)


def test_a_restarted_registry_adopts_the_liveness_and_rewrites_nothing(make, store):
    first = make(ttl=30)
    first.prepare()
    puts = [(record_key(first, n), f'"{n}"') for n in range(3)]
    apply(first, puts=puts)
    revisions = {key: store.revision(key) for key, _ in puts}
    host_revision = store.revision(first.host_dir)
    second = make(ttl=30)
    assert second.prepare() is False
    records = second.read()
    assert records.values == dict(puts) and records.detached == frozenset()
    assert {key: store.revision(key) for key, _ in puts} == revisions
    assert store.revision(first.host_dir) == host_revision


def test_a_liveness_of_another_ttl_takes_the_new_ttl(make, store):
    first = make(ttl=30)
    first.prepare()
    apply(first, puts=[(record_key(first, 1), "one")])
    second = make(ttl=12)
    # v2 keeps the directory and its records, and its next refresh sets the new TTL; v3 cannot
    # change a lease's TTL: a new lease, and every record is written again on it
    assert second.prepare() is (store.api != 2)
    assert second.heartbeat(1.0) is None
    assert 0 < store.liveness(second.host_dir) <= 12
    if store.api != 2:  # still on the old lease: read says so, and the reconciler rewrites it
        assert second.read().detached == {record_key(first, 1)}
        apply(second, puts=[(record_key(first, 1), "one")])
        assert store.lease_of(record_key(first, 1)) == second.lease


def test_without_ttl_nothing_expires(make, store):
    registry = make(ttl=0)
    registry.prepare()
    apply(registry, puts=[(record_key(registry, 1), "one")])
    if store.api != 2:
        assert store.liveness(registry.host_dir) == 0 and store.lease_of(record_key(registry, 1)) == 0
    else:
        assert store.liveness(registry.host_dir) == 0


def test_clear_takes_every_key_of_this_host_and_nothing_else(make, store):
    registry = make()
    registry.prepare()
    apply(registry, puts=[(record_key(registry, n), "x") for n in range(3)])
    store.put(f"{make.prefix}/{NEIGHBOUR}-keep", "other")
    registry.clear()
    assert store.records(registry.host_dir) == {} and not store.host_present(registry.host_dir)
    assert store.get(f"{make.prefix}/{NEIGHBOUR}-keep") == "other"


def test_a_full_reconcile_tidies_what_holds_no_kept_key(make, store):
    registry = make()
    registry.prepare()
    keep = record_key(registry, 1)
    gone = record_key(registry, 2, image="old::image:1")
    apply(registry, puts=[(keep, "k"), (gone, "g")])
    registry.read()
    apply(registry, deletes=[gone], keep={keep})
    assert store.records(registry.host_dir) == {keep: "k"}
    if store.api == 2:  # the emptied image directory went too
        with pytest.raises(etcd.EtcdKeyNotFound):
            store.client.read(f"{registry.host_dir}/old::image:1")


def test_without_ttl_a_restart_rewrites_nothing(make, store):
    first = make(ttl=0)
    first.prepare()
    apply(first, puts=[(record_key(first, 1), "one")])
    first.read()
    revisions = {key: store.revision(key) for key in (first.host_dir, record_key(first, 1))}
    second = make(ttl=0)
    assert second.prepare() is False
    assert second.read().values == {record_key(first, 1): "one"}
    assert {key: store.revision(key) for key in revisions} == revisions


def test_keys_of_others_on_the_lease_are_kept_said_and_never_taken_on_clear(make, store, caplog):
    """Another host's key on this host's lease (an operator's `etcdctl put --lease`): the lease is
    still this host's, adopted by a restart (no record rewritten), but revoking it on exit would
    delete what this host does not own: clear deletes this host's keys and leaves the lease."""
    if store.api == 2:
        pytest.skip("v2 has no leases: its host directory is this host's key")
    neighbour = f"{make.prefix}/{NEIGHBOUR}/img:1/{'a' * 64}"
    lease = store.grant_lease(30)
    registry = make(ttl=30)
    store.put(neighbour, "theirs", lease=lease)
    store.put(registry.host_dir, '{"registrar":"1.0.0","started":"2026-01-01T00:00:00Z"}', lease=lease)
    assert registry.prepare() is True  # adopted; the host key is written again, with the engine
    assert registry.lease == lease and store.lease_of(registry.host_dir) == lease
    said = [r for r in caplog.records if r.fields.get("event") == "foreign_keys_on_lease"]
    assert [(r.levelname, r.fields["keys"]) for r in said] == [("WARNING", [neighbour])]
    assert registry.clear() is True
    assert store.get(neighbour) == "theirs" and store.lease_ttl(lease)[0] > 0
    assert not store.host_present(registry.host_dir) and store.records(registry.host_dir) == {}


def test_clear_after_the_liveness_went_is_done_without_an_error(make, store):
    registry = make(ttl=30)
    registry.prepare()
    apply(registry, puts=[(record_key(registry, 1), "one")])
    if store.api != 2:
        store.revoke(store.lease_of(registry.host_dir))
    else:
        store.delete(registry.host_dir)
    registry.clear()
    assert store.records(registry.host_dir) == {} and not store.host_present(registry.host_dir)


def test_a_registry_of_another_engine_adopts_nothing_writes_nothing_and_clears_nothing(make, store):
    first = make(ttl=30)
    first.prepare()
    puts = [(record_key(first, n), f'"{n}"') for n in range(2)]
    apply(first, puts=puts)
    revisions = {key: store.revision(key) for key in [first.host_dir, *dict(puts)]
                 if store.api != 2 or key != first.host_dir}
    other = make(ttl=30, engine="ENGINE:OTHER:2")
    with pytest.raises(register.AddressConflict) as raised:
        other.prepare()
    where = f"{first.host_dir} on lease {first.lease:x}" if store.api != 2 else f"{first.host_dir}/_registrar"
    assert str(raised.value) == (
        f"HOST_IP {HOST} is claimed by two Docker engines: this one (ENGINE:OTHER:2) and {ENGINE}; its "
        f"registrar holds {where}; registering nothing and touching none of its keys until one of the "
        "hosts is given another HOST_IP or the other registrar stops and its "
        f"{first.LIVENESS} expires (see the README, \"Two engines, one HOST_IP\")")
    assert raised.value.fields == {"address": HOST, "engine": "ENGINE:OTHER:2", "other": ENGINE}
    assert other.clear() is False
    assert store.records(first.host_dir) == dict(puts)
    assert {key: store.revision(key) for key in revisions} == revisions
    first.clear()  # the other one goes: the address is free, and taken
    assert other.prepare() is True
    apply(other, puts=[(record_key(other, 7), '"7"')])
    assert store.records(other.host_dir) == {record_key(other, 7): '"7"'}


def owner_key(registry: register.Registry) -> str:
    """Where the owner of the address is recorded: the v3 host key, the v2 hidden key."""
    return f"{registry.host_dir}/_registrar" if registry.API == 2 else registry.host_dir


def raw_put(server, store: stores.Store, key: str, value: bytes) -> None:
    """A value as an operator or an attacker may write it: any bytes, any size."""
    if store.api == 0:
        store.put(key, value.decode("utf-8", "surrogateescape"))
    elif store.api == 3:
        store.call("kv/put", {"key": register._b64(key), "value": base64.b64encode(value).decode()})
    else:
        answer = requests.put(f"{server.url}/v2/keys{key}", data={"value": value}, timeout=5)
        assert answer.status_code in (200, 201), answer.text


JUNK = {"not UTF-8": b"\xff\xfe{\x80", "deeply nested": b"[" * 100_000, "a JSON list": b"[1, 2]",
        "a forged log line": b'{"registrar":"1.0.0","started":"T\\n2026-12-04T00:00:00.000Z error   FORGED",'
                             b'"engine":"X"}',
        "a megabyte": b'{"registrar":"1.0.0","started":"' + b"9" * 1_000_000 + b'","engine":"X"}',
        "an engine that is no word": b'{"registrar":"1.0.0","started":"2026-01-01T00:00:00Z","engine":"a b"}'}


@pytest.mark.parametrize("junk", list(JUNK), ids=list(JUNK))
def test_junk_where_the_owner_is_recorded_is_replaced_by_this_registrars_record(server, make, store,
                                                                                 junk, caplog):
    registry = make(ttl=30)
    raw_put(server, store, owner_key(registry), JUNK[junk])
    assert registry.prepare() is True
    apply(registry, puts=[(record_key(registry, 1), "one")])
    value = json.loads(store.get(owner_key(registry)))
    assert value == {"registrar": register.VERSION, "started": value["started"], "engine": ENGINE}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value["started"])
    assert store.records(registry.host_dir) == {record_key(registry, 1): "one"}
    assert "FORGED" not in caplog.text and all("\n" not in r.getMessage() for r in caplog.records)


def test_a_heartbeat_that_finds_the_host_directory_made_anew_says_it_was_lost(make, store):
    """An operator's `rm -r`, then a record write that made the directory again (without a TTL,
    which the refresh then gives it): the refresh succeeds, on a directory that is not the one
    this registrar made, and whose owner is to be looked at again."""
    if store.api != 2:
        pytest.skip("v3 and the memory fake have no directories: a lease lost is answered TTL 0")
    registry = make(ttl=30)
    registry.prepare()
    store.delete(registry.host_dir)
    store.put(record_key(registry, 1), "one")  # what a put of the reconciler's would do now
    assert registry.heartbeat(2.0) == f"host directory {registry.host_dir} had expired or lost its TTL"
    assert registry.prepare() is False  # the directory is there, with its TTL: it is claimed again
    assert json.loads(store.get(owner_key(registry)))["engine"] == ENGINE
    assert registry.heartbeat(2.0) is None


def test_a_read_that_finds_the_host_directory_gone_makes_it_anew_before_any_write(make, store):
    if store.api != 2:
        pytest.skip("v3 and the memory fake: the guard of every transaction is the host key")
    registry = make(ttl=30)
    registry.prepare()
    store.delete(registry.host_dir)
    head = store.head()
    with pytest.raises(register.HostLost):
        registry.read()
    assert store.head() == head and not store.host_present(registry.host_dir)  # the read wrote nothing
    assert registry.prepare() is True
    assert 0 < store.liveness(registry.host_dir) <= 30


def test_clear_after_the_lease_went_says_nothing_was_left(make, store, caplog):
    if store.api == 2:
        pytest.skip("v2: the directory's delete is not guarded")
    registry = make(ttl=30)
    registry.prepare()
    store.revoke(registry.lease)
    assert registry.clear() is True
    assert [r.getMessage() for r in caplog.records if r.fields.get("event") == "deregister_skipped"] == [
        f"nothing left to delete under {registry.host_dir}/ on exit: the lease had expired or been revoked"]
