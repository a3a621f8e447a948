"""Three hosts, one etcd cluster across them, a registrar on each (tests/cluster.py): the checks of
the Vagrant cluster, on real engines, real etcd members and real links, on both APIs.

Every registrar has its own HOST_IP and speaks to its own host's etcd member only
(register.service's default ETCD_ENDPOINT, http://$HOST_IP:2379): what another host sees arrives
through the etcd cluster. Each test runs on both flavours (conftest.FLAVOURS).
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import cluster as bed
import image
import invariant
import pytest
from testbed import BASE_IMAGE, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]

# REGISTER_TTL. Short, for quick expiries, but not shorter: when the etcd leader dies, the refresh
# that a healthy host's registrar sends to its own member (now leaderless) hangs until it times out
# and is retried. Refreshed every TTL/3, a v2 TTL must outlast TTL/3 + that wait + the election
# (3.6-4.5 s measured here), or the host directories of the *healthy* hosts expire and are written
# again: seen at TTL 6 on etcd 3.4 when the refresh waited the whole request timeout (5 s), which
# is why register.py now waits at most TTL/3 for a heartbeat. v3 leases survive it: a new leader
# renews every lease. 12 leaves a margin on a loaded 2-core machine.
TTL = 12
RESYNC = 5
# the last refresh (every TTL/3) came at most TTL/3 before the fault: nothing may go earlier
EARLIEST_EXPIRY = TTL - TTL / 3 - 0.5


@pytest.fixture(scope="module")
def hosts(workdir, engine, registrar_image):
    if os.geteuid() != 0:
        pytest.fail("the cluster test bed makes network namespaces and runs dockerd: run as root")
    three = bed.Cluster(workdir)
    try:
        started = time.monotonic()
        three.create()
        note("3 hosts made (namespaces, links, dockerds, busybox image)", time.monotonic() - started)
        three.image = load_image(engine, registrar_image, three)
        yield three
    finally:
        three.destroy()


def load_image(engine, tag: str, three: bed.Cluster) -> str:
    """The session's registrar image (built in the suite's engine), loaded into each host's."""
    started = time.monotonic()
    three.each(lambda host: image.load_into(engine, host.engine, tag))
    note("registrar image loaded from the suite's engine into the three hosts'", time.monotonic() - started)
    for step, seconds in image.TIMINGS:
        note(f"  image: {step}", seconds)
    return tag


@pytest.fixture(scope="module")
def cluster(hosts, flavour):
    hosts.start_etcd(flavour["version"], flavour["v2"], flavour["api"],
                     token=f"rtC-{os.getpid()}-{flavour['name']}")
    yield hosts
    hosts.stop_etcd()


@pytest.fixture(scope="module")
def registry(cluster, flavour):
    """A registrar on each host, as register.service runs it, for the flavour's tests; its prefix."""
    name = f"/rtc-{flavour['name']}/registered"
    settings = {"REGISTER_PREFIX": name, "REGISTER_TTL": str(TTL), "REGISTER_RESYNC": str(RESYNC),
                "ETCD_API": str(flavour["api"]), "LOG_LEVEL": "debug"}
    started = time.monotonic()
    cluster.each(lambda host: host.start_registrar(cluster.image, settings))
    note("3 registrar containers started", time.monotonic() - started)
    yield name
    cluster.each(bed.Host.stop_registrar)


@pytest.fixture
def prefix(cluster, registry):
    """The registry's prefix, holding the three live hosts and nothing else when the test starts;
    at the end every host is powered and connected again and its containers are removed."""
    bed.wait_for_registry(cluster.hosts[0].member.store(), registry, cluster.hosts, 30, cluster)
    yield registry
    cluster.restore()
    cluster.each(bed.Host.remove_workload)


def note(what: str, seconds: float) -> None:
    invariant.record(f"cluster: {what}", seconds)
    print(f"{seconds:6.2f} s  {what}")


def revisions(store, prefix: str, host: bed.Host) -> dict[str, int]:
    return {key: store.revision(key) for key in store.records(f"{prefix}/{host.address}")}


def test_every_member_sees_every_hosts_records(cluster, prefix, flavour):
    h1, h2, h3 = cluster.hosts
    h1.run_container("-p", "80")
    h2.run_container("-p", "8080:80")
    h3.run_container("-p", "80", "-p", "8443:443")
    started = time.monotonic()
    for host in cluster.hosts:  # the look-up from any member: every host's records, byte-exact
        seconds = bed.wait_for_registry(host.member.store(), prefix, cluster.hosts, 30, cluster,
                                        since=started)
        note(f"v{flavour['api']}: 3 hosts' records seen on {host.name}'s member", seconds)
    records = cluster.hosts[0].member.store().records(prefix)
    assert sum(key.count("/") == prefix.count("/") + 3 for key in records) == 3
    assert all(host.member.store().records(prefix) == records for host in cluster.hosts)


def test_the_leaders_host_powered_off_expires_and_comes_back(cluster, prefix, flavour):
    """The worst host to lose: the etcd leader's. The two others keep quorum and their records."""
    dead = cluster.leader()
    others = [host for host in cluster.hosts if host is not dead]
    for host in others:
        host.run_container("-p", "80")
    dead.run_container("--restart", "always", "-p", "80")
    dead.run_container("-p", "8081:80")  # no restart policy: not running after the reboot
    store = others[0].member.store()
    bed.wait_for_registry(store, prefix, cluster.hosts, 30, cluster)
    before = {host.name: revisions(store, prefix, host) for host in others}

    dead.power_off()
    off = time.monotonic()
    others[0].run_container("-p", "80")  # two members of three: the cluster still takes writes
    seconds = bed.wait_for_registry(store, prefix, others, TTL + 15, cluster, since=off)
    note(f"v{flavour['api']}: powered-off leader's host's records expired (TTL {TTL} s)", seconds)
    assert seconds >= EARLIEST_EXPIRY, "the records went before their TTL could have run out"
    for host in others:  # untouched: not one of the other hosts' records was rewritten
        now = revisions(store, prefix, host)
        assert {key: now[key] for key in before[host.name]} == before[host.name], (
            f"{host.name}'s records were rewritten; its registrar's log:\n{host.registrar_log()[-8000:]}")

    booted = time.monotonic()
    dead.power_on()  # dockerd, the etcd member, then the registrar as the unit starts it
    note(f"v{flavour['api']}: power-on (dockerd, etcd member, registrar container started)",
         time.monotonic() - booted)
    wait_until(lambda: dead.engine.out("ps", "-q", "--filter", f"ancestor={BASE_IMAGE}"), 30,
               "the restart=always container back")
    running = dead.engine.out("ps", "--filter", f"ancestor={BASE_IMAGE}", "--format", "{{.Ports}}")
    assert len(running.splitlines()) == 1 and "8081" not in running, running
    for host in (dead, others[0]):
        seconds = bed.wait_for_registry(host.member.store(), prefix, cluster.hosts, 60, cluster,
                                        since=booted)
        note(f"v{flavour['api']}: powered-on host re-registered, seen on {host.name}'s member", seconds)
    assert_logs_are_clean(cluster)


def test_a_host_cut_off_longer_than_the_ttl_re_registers_by_itself(cluster, prefix, flavour):
    h1, h2, h3 = cluster.hosts
    for host in cluster.hosts:
        host.run_container("-p", "80")
    store = h1.member.store()
    bed.wait_for_registry(store, prefix, cluster.hosts, 30, cluster)
    registrar = h2.registrar_id()

    h2.cut()
    cut = time.monotonic()
    seconds = bed.wait_for_registry(store, prefix, [h1, h3], TTL + 15, cluster, since=cut)
    note(f"v{flavour['api']}: cut-off host's records expired on the majority (TTL {TTL} s)", seconds)
    assert seconds >= EARLIEST_EXPIRY, "the records went before their TTL could have run out"
    h2.run_container("-p", "80")  # started while cut off: written once the link is back
    time.sleep(max(0.0, cut + TTL + 3 - time.monotonic()))

    h2.reconnect()
    back = time.monotonic()
    for host in (h1, h2, h3):
        seconds = bed.wait_for_registry(host.member.store(), prefix, cluster.hosts, 60, cluster,
                                        since=back)
        note(f"v{flavour['api']}: link back, host re-registered, seen on {host.name}'s member", seconds)
    assert h2.registrar_id() == registrar and h2.registrar_running(), "the registrar was restarted"
    assert_logs_are_clean(cluster)


def test_the_leader_host_cut_off_the_others_write_through_the_new_leader(cluster, prefix, flavour):
    for host in cluster.hosts:
        host.run_container("-p", "80")
    bed.wait_for_registry(cluster.hosts[0].member.store(), prefix, cluster.hosts, 30, cluster)
    old = cluster.leader()
    others = [host for host in cluster.hosts if host is not old]
    before = {host.name: revisions(cluster.hosts[0].member.store(), prefix, host) for host in others}

    old.cut()
    cut = time.monotonic()
    for host in others:
        host.run_container("-p", "80")
    new = wait_until(lambda: _leader_among(cluster, others), 30, "a new leader among the two others")
    note(f"v{flavour['api']}: {new.name} elected leader after {old.name}, the leader's host, was cut off",
         time.monotonic() - cut)
    store = others[0].member.store()
    wanted = {}
    for host in others:
        wanted.update(invariant.expected_registry(host.engine, prefix, host.address))
    # a write needs two members of three now: the new containers' records can only come through
    # the new leader
    wait_until(lambda: wanted.items() <= store.records(prefix).items(), 30,
               "the new containers' records on the majority")
    note(f"v{flavour['api']}: leader's host cut off: new containers on the 2 others registered",
         time.monotonic() - cut)
    seconds = bed.wait_for_registry(store, prefix, others, TTL + 20, cluster, since=cut)
    note(f"v{flavour['api']}: leader's host cut off: its records expired on the majority", seconds)
    bed.wait_for_registry(others[1].member.store(), prefix, others, 10, cluster)
    for host in others:  # no flap: the records they had were not written again
        now = revisions(store, prefix, host)
        assert {key: now[key] for key in before[host.name]} == before[host.name], (
            f"{host.name}'s records were rewritten; its registrar's log:\n{host.registrar_log()[-8000:]}")

    old.reconnect()
    back = time.monotonic()
    seconds = bed.wait_for_registry(old.member.store(), prefix, cluster.hosts, 60, cluster, since=back)
    note(f"v{flavour['api']}: old leader's host back, re-registered", seconds)
    assert_logs_are_clean(cluster)


def assert_logs_are_clean(cluster: bed.Cluster) -> None:
    """No traceback in any registrar's log, and every warning says what happens next."""
    for host in cluster.hosts:
        invariant.assert_log_is_clean(SimpleNamespace(log=host.registrar_log()))


def _leader_among(cluster: bed.Cluster, hosts: list[bed.Host]) -> bed.Host | None:
    try:
        leader = cluster.leader()
    except RuntimeError:
        return None
    return leader if leader in hosts else None
