"""The chaos suite: every fault really breaks a real process, then one checker proves convergence.

dockerd, etcd and register.py run as real processes and are broken for real: kill -9, SIGSTOP and
SIGCONT, restarts, a wiped data directory, a network partition (a proxy that drops every byte).
After each fault heals, `invariant.Invariant` compares the registry with the truth from
`docker ps` + `docker inspect` (exact keys and bytes, the host directory's TTL, the neighbours'
keys and their modifiedIndex) and prints the difference on failure. The convergence times are
printed at the end of the session.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import docker as docker_sdk
import pytest
from faults import Churn, OddDocker, Partition, Pauser, paused, rss_kib, threads
from invariant import Invariant, assert_log_is_clean, expected_registry, history, record
from testbed import BASE_IMAGE, HOST, EtcdCluster, end, read_tree, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.json_log]

_names = itertools.count(1)


def start(engine, *args: str) -> str:
    return engine.out("run", "-d", *args, BASE_IMAGE)


def start_many(engine, count: int, args: tuple[str, ...] = ("-p", "80")) -> list[str]:
    """As fast as the engine allows: eight docker clients at once."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: start(engine, *args), range(count)))


# -- 1. etcd killed during churn ------------------------------------------------------------

def test_etcd_killed_during_churn_converges_with_bounded_threads_and_memory(
        docker, registrar, prefix, own_etcd):
    r = registrar(endpoint=own_etcd.endpoint)
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    r.wait_for_event("reconciled")
    churn = Churn(docker, total=50, keep=12).start()
    wait_until(lambda: len(churn.started) >= 8, 120, "8 containers churned")
    end(own_etcd.process, signal.SIGKILL)
    r.wait_for_event("retry", cause=lambda cause: cause.endswith(" failed: connection refused"))
    pid = r.process.pid
    samples = []  # (threads, RSS in KiB) every half second while etcd is gone and the churn goes on
    while len(churn.started) < 45 and churn.errors < 5:
        samples.append((threads(pid), rss_kib(pid)))
        time.sleep(0.5)
    outage_events = len(churn.started)
    own_etcd.start()  # with its data
    healed = time.monotonic()
    churn.wait()
    check.wait(40, r, since=healed, fault="etcd killed -9 during churn of 50 containers")
    assert churn.errors == 0
    pending = [e["pending"] for e in r.events("retry") if "pending" in e]  # Docker's retries have none
    assert max(pending) <= outage_events  # coalesced per container, however many events
    assert len(samples) >= 10
    thread_counts = [count for count, _ in samples]
    assert max(thread_counts) <= 11, thread_counts  # main, reconciler, events and 8 I/O threads
    assert thread_counts[-1] <= thread_counts[0], thread_counts
    rss = [kib for _, kib in samples]
    assert rss[-1] - rss[0] < 4096, f"RSS grew from {rss[0]} to {rss[-1]} KiB during the outage"
    print(f"etcd outage: {len(samples)} samples, threads {min(thread_counts)}-{max(thread_counts)}, "
          f"RSS {rss[0]} -> {rss[-1]} KiB, pending at most {max(pending)}")
    assert r.events("recovered")
    assert_log_is_clean(r)


# -- 2. etcd paused longer than the client timeout -------------------------------------------

def test_etcd_paused_longer_than_the_request_timeout(docker, registrar, prefix, own_etcd):
    steady = [start(docker, "--name", f"steady-{n}", "-p", "80") for n in range(3)]
    leaving = [start(docker, "--name", f"leaving-{n}", "-p", "80") for n in range(2)]
    r = registrar(endpoint=own_etcd.endpoint)
    client = own_etcd.store()
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    steady_indexes = check.record_indexes(steady)
    before = client.head()
    with paused(own_etcd.process.pid):
        paused_at = time.monotonic()
        for n in range(4):
            start(docker, "--name", f"arriving-{n}", "-p", "80")
        docker.docker("stop", "-t", "0", *leaving)
        r.wait_for_event("retry", timeout=15,  # no hang
                         cause=lambda cause: cause.startswith(f"etcd at {own_etcd.url} failed: timed out"))
        time.sleep(max(0.0, 8 - (time.monotonic() - paused_at)))
    resumed = time.monotonic()
    check.wait(30, r, since=resumed, fault="etcd SIGSTOPped 8 s (request timeout 5 s)")
    # No duplicate work. The records of containers that ran throughout were never rewritten (no
    # flap for watchers); each removal was one delete; each arriving key only ever got its right
    # value. A put that timed out may have been applied when etcd resumed: the full reconcile that
    # follows any etcd failure re-reads the tree, so it is not made twice (unless etcd applied it
    # after that read: then twice, with the same value).
    assert check.record_indexes(steady) == steady_indexes
    final = read_tree(client, check.host_dir)
    if client.api == 3:  # v3 keeps no v2 event history to replay here: the log and the end state
        assert sorted(final) == sorted(key for key in final if key.rsplit("/", 1)[1] not in leaving)
        for n in range(4):
            assert len(r.events("registered", container=f"arriving-{n}")) <= 1
        assert "full reconcile (etcd failed: re-reading what it holds)" in r.log
        assert_log_is_clean(r)
        return
    changes = history(client.client, check.host_dir, before)
    assert sorted(key.rsplit("/", 1)[1] for action, key, _ in changes if action == "delete") == \
        sorted(leaving)
    puts = [(key, value) for action, key, value in changes if action == "set"]
    assert {key for key, _ in puts} == final.keys() - steady_indexes.keys()
    assert all(final[key] == value for key, value in puts)
    assert len(puts) <= 4 + len(r.events("registered", container=lambda name: name.startswith("arriving-")))
    for n in range(4):
        assert len(r.events("registered", container=f"arriving-{n}")) <= 1
    for n, cid in enumerate(leaving):
        assert len(r.events("removed", container=f"leaving-{n}", id=cid[:12], image="regtest/busybox:1",
                            ports=lambda ports: ports.startswith("80/tcp="))) == 1
    assert "full reconcile (etcd failed: re-reading what it holds)" in r.log
    assert_log_is_clean(r)


# -- 3. etcd wiped ----------------------------------------------------------------------------

def test_etcd_wiped_everything_is_reregistered_within_one_refresh_interval(
        docker, registrar, prefix, own_etcd):
    for _ in range(5):
        start(docker, "-p", "80")
    ttl = 6  # a refresh every 2 s
    r = registrar(endpoint=own_etcd.endpoint, ttl=ttl)
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    check.wait(30, r)
    own_etcd.stop()
    shutil.rmtree(own_etcd.data_dir)
    own_etcd.start()  # empty
    restarted = time.monotonic()
    check.seed_neighbours()  # they went with the data too
    seconds = check.wait(ttl / 3 + 3, r, since=restarted, fault="etcd wiped (TTL 6 s: refresh every 2 s)")
    assert seconds < ttl / 3 + 3
    if own_etcd.api == 2:
        assert (f"host directory {check.host_dir} was (re)created" in r.log
                or "host directory had expired" in r.log)
    else:
        assert re.search(rf"lease [0-9a-f]+ of {re.escape(check.host_dir)} had expired or been revoked "
                         r"\(.+\); re-registering everything on new lease [0-9a-f]+", r.log)
    assert_log_is_clean(r)


# -- 4. etcd down when register.py starts ------------------------------------------------------

def test_etcd_down_at_start_waits_with_backoff_then_registers(docker, registrar, prefix, new_etcd):
    for n in range(3):
        start(docker, "-p", f"{8500 + n}:80")
    late = new_etcd(f"late{next(_names)}")
    r = registrar(endpoint=late.endpoint)
    refused = f"etcd at {late.url} failed: connection refused"
    retries = r.wait_for_event("retry", count=3, cause=refused, pending=0)
    delays = [e["retry_in"] for e in retries]
    assert all(0 <= delay <= cap for delay, cap in zip(delays, (0.5, 1, 2, 4, 8, 10)))
    late.start()
    try:
        check = Invariant(docker, late.store(), prefix, HOST)
        check.wait(20, r, since=time.monotonic(), fault="etcd down at start, then up")
        recovered = r.wait_for_event("recovered")
        attempts = len(r.events("retry", cause=refused, pending=0))  # each one said with 0 pending
        assert recovered[0]["message"] == (f"recovered after {attempts} failed attempt(s); "
                                           f"last cause: {refused}")
        assert_log_is_clean(r)
    finally:
        late.stop()


# -- 5. dockerd restarted during churn --------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_dockerd_restarted_during_churn(docker, client, registrar, prefix, sig):
    for _ in range(3):
        start(docker, "--restart", "always", "-p", "80")
    r = registrar()
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    churn = Churn(docker, total=30, keep=8, seed=sig).start()
    wait_until(lambda: len(churn.started) >= 8, 120, "8 containers churned")
    docker.stop_daemon(sig)
    r.wait_for_event("disconnected")
    time.sleep(1)  # the churn fails meanwhile; containers die with dockerd
    docker.start_daemon()
    churn.wait()  # and goes on once dockerd is back: containers start while register.py reconnects
    check.wait(40, r, since=time.monotonic(),
               fault=f"dockerd {signal.Signals(sig).name} and restarted during churn (after the churn)")
    r.wait_for_event("reconnected")
    entries = r.entries()
    reconnects = [n for n, e in enumerate(entries) if e.get("event") == "reconnected"] + [len(entries)]
    # between the first reconnection and the next: the full reconcile it brings (its reason is in
    # the message only)
    assert [e for e in entries[reconnects[0] + 1:reconnects[1]] if e.get("event") == "reconciled"
            and "full reconcile (connected to Docker's event stream)" in e["message"]], r.log[-6000:]
    assert_log_is_clean(r)


# -- 6. the Docker socket absent at start, and Docker gone for longer than the TTL -------------

def test_docker_socket_absent_at_start(docker, client, registrar, prefix, workdir):
    for n in range(3):
        start(docker, "-p", f"{8510 + n}:80")
    later = workdir / f"later{next(_names)}.sock"
    r = registrar(docker_host=f"unix://{later}")
    waiting = r.wait_for_event("retry", count=2, cause=f"Docker at unix://{later} failed: no such file or "
                               "directory")
    assert all(e["message"].startswith(f"waiting for Docker: {e['cause']}; retrying in ") for e in waiting)
    check = Invariant(docker, client, prefix, HOST)
    later.symlink_to(docker.socket)  # the engine's socket appears
    check.wait(20, r, since=time.monotonic(), fault="Docker socket absent at start, then present")
    assert r.wait_for_event("connected")[0]["message"] == f"connected to Docker at unix://{later}"
    assert_log_is_clean(r)


def test_docker_gone_longer_than_the_ttl_lets_the_records_expire_then_restores_them(
        docker, client, registrar, prefix):
    start(docker, "--restart", "always", "-p", "80")
    start(docker, "-p", "80")  # dies with dockerd and stays dead
    ttl = 4
    r = registrar(ttl=ttl)
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    docker.stop_daemon()
    stopped = time.monotonic()
    # nobody can vouch for the records now: they expire with the host directory
    wait_until(lambda: not read_tree(client, check.host_dir), ttl + 3, "the records to expire")
    expired_after = time.monotonic() - stopped
    assert expired_after <= ttl + 3
    what = "TTL" if client.api == 2 else "lease"
    said = r.wait_for_event("refresh_suspended")
    assert [e["message"] for e in said] == [f"Docker is unreachable: no longer refreshing the {what} of "
                                            f"{check.host_dir}; its records expire within {ttl} s unless "
                                            "Docker returns"]
    docker.start_daemon()
    check.wait(30, r, since=time.monotonic(), fault="dockerd stopped longer than the TTL (4 s), then back")
    assert_log_is_clean(r)


# -- 7 and 8. register.py killed -9 ------------------------------------------------------------

def test_register_killed_and_restarted_keeps_unchanged_keys(docker, client, registrar, prefix):
    staying = [start(docker, "-p", "80") for _ in range(3)]
    leaving = start(docker, "--name", "leaving", "-p", "80")
    first = registrar()
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, first)
    indexes = check.record_indexes(staying)
    first.kill()
    docker.docker("stop", "-t", "0", leaving)
    arriving = start(docker, "--name", "arriving", "-p", "80")
    second = registrar()
    check.wait(30, second, since=time.monotonic(), fault="register.py killed -9 and restarted")
    assert check.record_indexes(staying) == indexes  # no flap
    assert f"registered arriving ({arriving[:12]})" in second.log
    assert f"removed stale record of {leaving[:12]} image regtest::busybox:1" in second.log
    assert "1 written, 1 removed, 3 already right" in second.log
    assert_log_is_clean(second)


def test_register_killed_and_not_restarted_the_subtree_expires_after_the_ttl(
        docker, client, registrar, prefix):
    for _ in range(3):
        start(docker, "-p", "80")
    ttl = 4
    r = registrar(ttl=ttl)
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    r.kill()
    killed = time.monotonic()
    assert len(read_tree(client, check.host_dir)) == 3  # still there right after the kill

    wait_until(lambda: not client.host_present(check.host_dir), ttl + 2, "the host directory to expire",
               interval=0.1)
    assert read_tree(client, check.host_dir) == {}
    seconds = time.monotonic() - killed
    assert seconds <= ttl + 2
    assert check.neighbour_changes() == []
    record(f"v{client.api}: register.py killed -9, not restarted: subtree expired (TTL 4 s)", seconds)


# -- 9. operator mistakes ----------------------------------------------------------------------

def test_operator_deletes_and_edits_are_repaired(docker, client, registrar, prefix):
    cids = [start(docker, "-p", "80") for _ in range(3)]
    resync, ttl = 3, 6
    r = registrar(resync=resync, ttl=ttl)
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    keys = sorted(read_tree(client, check.host_dir))
    client.delete(keys[0])
    check.wait(resync + 3, r, since=time.monotonic(), fault="operator deleted a key (resync 3 s)")
    client.put(keys[1], '[{"container":"wrong"}]')
    check.wait(resync + 3, r, since=time.monotonic(), fault="operator wrote a wrong value (resync 3 s)")
    client.put(f"{check.host_dir}/regtest::busybox:1/{'f' * 64}", "stray")
    check.wait(resync + 3, r, since=time.monotonic(), fault="operator wrote a stray key (resync 3 s)")
    if client.api == 2:
        client.delete(check.host_dir)  # the whole directory
    else:
        client.revoke(client.lease_of(check.host_dir))  # the host key and every record with it
    check.wait(ttl / 3 + 3, r, since=time.monotonic(),
               fault="operator deleted the host directory / revoked the lease (refresh every 2 s)")
    assert re.search(r"(had expired or lost its TTL|had expired or been revoked \(.+\)); re-registering "
                     "everything", r.log)
    assert len(cids) == len(read_tree(client, check.host_dir))
    assert_log_is_clean(r)


def test_register_killed_and_restarted_after_the_ttl_registers_everything_again(
        docker, client, registrar, prefix):
    cids = [start(docker, "-p", "80") for _ in range(3)]
    ttl = 4
    first = registrar(ttl=ttl)
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, first)
    first.kill()
    wait_until(lambda: not client.host_present(check.host_dir), ttl + 3, "the liveness to expire",
               interval=0.1)
    second = registrar(ttl=ttl)
    check.wait(30, second, since=time.monotonic(), fault="register.py killed -9, restarted after the TTL")
    assert f"{len(cids)} written, 0 removed, 0 already right" in second.log
    if client.api == 3:
        assert not second.events("lease_adopted") and second.events("lease_granted")
    assert_log_is_clean(second)


# etcd 3.5.0 to 3.5.2 can lose consistency after a crash (etcd-io/etcd#13766): the faults that
# kill members run on 3.4 as well, with both APIs
@pytest.mark.parametrize(("api", "version"), [(2, "3.4"), (3, "3.4"), (3, "3.5")],
                         ids=["v2-3.4", "v3-3.4", "v3-3.5"])
def test_the_leader_of_a_three_member_cluster_killed(docker, own_registrar, prefix, workdir, api, version):
    cluster = EtcdCluster(workdir, f"c{next(_names)}-", version=version, v2=api == 2, api=api)
    cluster.start()
    try:
        start(docker, "-p", "80")
        ttl = 6
        r = own_registrar(endpoint=cluster.endpoint, ttl=ttl, env={"ETCD_API": str(api)})
        check = Invariant(docker, cluster.members[0].store(), prefix, HOST)
        check.wait(30, r)
        leader = cluster.leader()
        end(leader.process, signal.SIGKILL)
        killed = time.monotonic()
        for _ in range(3):
            start(docker, "-p", "80")
        survivor = next(m for m in cluster.members if m is not leader)
        check = Invariant(docker, survivor.store(), prefix, HOST)
        check.wait(40, r, since=killed, fault=f"leader of 3 etcd {version} members killed -9")
        cluster.start_member(leader)  # back with its data: it catches up
        wait_until(leader._healthy, 60, "the old leader back")
        time.sleep(ttl)  # refreshes and resyncs go on with the member back
        Invariant(docker, leader.store(), prefix, HOST).wait(20, r)
        assert_log_is_clean(r)
    finally:
        cluster.stop()


# -- 10. a partition longer than the TTL -------------------------------------------------------

def test_partition_longer_than_the_ttl(docker, registrar, prefix, own_etcd):
    leaving = start(docker, "-p", "80")
    start(docker, "-p", "80")
    ttl = 4
    link = Partition(own_etcd.client_port)
    try:
        r = registrar(endpoint=link.endpoint, ttl=ttl)
        client = own_etcd.store()
        check = Invariant(docker, client, prefix, HOST)
        check.wait(30, r)
        link.cut()
        cut = time.monotonic()
        docker.docker("stop", "-t", "0", leaving)  # changes while the host is cut off
        start(docker, "-p", "80")
        wait_until(lambda: not read_tree(client, check.host_dir), ttl + 3, "the subtree to expire")
        r.wait_for_event("retry", timeout=15, cause=lambda cause: "failed: timed out" in cause)
        time.sleep(max(0.0, ttl + 3 - (time.monotonic() - cut)))
        link.heal()
        check.wait(20, r, since=time.monotonic(), fault="partition of 7 s, longer than the TTL (4 s)")
        assert_log_is_clean(r)
    finally:
        link.close()


def test_etcd_paused_longer_than_the_ttl(docker, registrar, prefix, own_etcd):
    start(docker, "-p", "80")
    ttl = 4
    r = registrar(endpoint=own_etcd.endpoint, ttl=ttl)
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    check.wait(30, r)
    with paused(own_etcd.process.pid):
        start(docker, "-p", "80")
        time.sleep(ttl + 3)
    check.wait(20, r, since=time.monotonic(), fault="etcd SIGSTOPped 7 s, longer than the TTL (4 s)")
    assert_log_is_clean(r)


# -- 11. event storm while etcd is slowed -------------------------------------------------------

@pytest.mark.slow
def test_event_storm_while_etcd_is_paused_one_second_in_three(docker, registrar, prefix, own_etcd):
    bystanders = [start(docker, "-p", "80") for _ in range(3)]
    r = registrar(endpoint=own_etcd.endpoint, resync=2)  # full reconciles amid the storm, too
    check = Invariant(docker, own_etcd.store(), prefix, HOST)
    check.wait(30, r)
    with Pauser(own_etcd.process.pid, pause=1.0, period=3.0) as pauser:
        storm = start_many(docker, 200)
        check.wait(60, r, since=time.monotonic(), fault="200 started while etcd paused 1 s in 3")
        docker.docker("kill", *storm, timeout=300)
        check.wait(60, r, since=time.monotonic(), fault="200 killed while etcd paused 1 s in 3")
    assert pauser.pauses >= 3
    assert sorted(key.rsplit("/", 1)[1] for key in read_tree(own_etcd.store(), check.host_dir)) == \
        sorted(bystanders)
    # each registered once and removed once
    entries = r.entries()

    def said(cid: str) -> list[str]:  # the events that name this container, in any field
        return [e.get("event") for e in entries if cid[:12] in json.dumps(e)]
    twice = {cid[:12]: said(cid) for cid in storm if said(cid) != ["registered", "removed"]}
    assert not twice, twice
    assert_log_is_clean(r)


def test_sigterm_during_an_event_storm_exits_in_two_seconds_and_leaves_no_half_record(
        docker, client, registrar, prefix):
    r = registrar()
    r.wait_for_event("reconciled")
    storm = threading.Thread(target=start_many, args=(docker, 60))
    storm.start()
    r.wait_for_event("registered", count=10, timeout=60)
    signalled = time.monotonic()
    assert r.stop(signal.SIGTERM, timeout=5) == 0
    assert time.monotonic() - signalled < 2
    storm.join()
    actual = read_tree(client, f"{prefix}/{HOST}")
    expected = expected_registry(docker, prefix, HOST)
    assert len(actual) >= 10
    # a record is one put: each key present is exactly right, the others are absent
    assert {key: expected.get(key) for key in actual} == actual


# -- 12. bad neighbours ----------------------------------------------------------------------

def test_bad_neighbours_are_handled_and_the_others_registered(docker, client, registrar, prefix):
    api = docker_sdk.APIClient(base_url=docker.host, version="auto")
    odd_labels = {"": "empty key", "tab\tand ü": "1", "huge": "x" * 100_000, "a=b": "=", "null": ""}
    labelled = api.create_container(BASE_IMAGE, labels=odd_labels, ports=[80],
                                    host_config=api.create_host_config(port_bindings={80: None}))
    api.start(labelled)
    long_name = "example.org:5000/" + "/".join(["x" * 50] * 4) + ":" + "t" * 79
    assert len(long_name) == 300
    docker.docker("tag", BASE_IMAGE, long_name)
    long_image = docker.out("run", "-d", "-p", "80", long_name)
    # Docker reports the binding with an empty HostIp and no HostPort, and publishes nothing
    unpublished = start(docker, "--network", "none", "-p", "80")
    bindings = docker.inspect(unpublished)["HostConfig"]["PortBindings"]
    assert bindings == {"80/tcp": [{"HostIp": "", "HostPort": ""}]}
    normal = [start(docker, "-p", "80") for _ in range(2)]
    r = registrar()
    check = Invariant(docker, client, prefix, HOST)
    check.wait(30, r)
    tree = read_tree(client, check.host_dir)
    assert {key.rsplit("/", 1)[1] for key in tree} == {labelled["Id"], long_image, *normal}
    long_key = f"{check.host_dir}/example.org:5000::{'::'.join(['x' * 50] * 4)}:{'t' * 79}/{long_image}"
    assert [entry["image"] for entry in json.loads(tree[long_key])] == [long_name.replace("/", "::")]
    assert_log_is_clean(r)


def test_bindings_docker_reports_oddly_are_handled_and_the_others_registered(
        docker, client, registrar, prefix, workdir):
    fine = start(docker, "--name", "fine", "-p", "80")

    def rewrite(inspect: dict) -> None:  # as an older or buggy engine might report them
        ports = inspect["NetworkSettings"]["Ports"]
        if inspect["Name"] == "/odd-empty-ip":  # an empty HostIp: taken as every address
            ports["80/tcp"] = [{"HostIp": "", "HostPort": ports["80/tcp"][0]["HostPort"]}]
        elif inspect["Name"] == "/odd-no-port":
            ports["80/tcp"] = [{"HostIp": "0.0.0.0"}]

    odd = OddDocker(docker, workdir / f"odd{next(_names)}.sock", rewrite)
    try:
        r = registrar(docker_host=odd.host)
        r.wait_for_event("reconciled")
        # started now, they are inspected on their start event (a full reconcile reads the list,
        # which the proxy leaves as Docker reports it)
        empty_ip = start(docker, "--name", "odd-empty-ip", "-p", "80")
        no_port = start(docker, "--name", "odd-no-port", "-p", "80")
        check = Invariant(docker, client, prefix, HOST)
        expected = expected_registry(docker, prefix, HOST)
        del expected[f"{check.host_dir}/regtest::busybox:1/{no_port}"]
        assert sorted(key.rsplit("/", 1)[1] for key in expected) == sorted([empty_ip, fine])
        wait_until(lambda: read_tree(client, check.host_dir) == expected, 30, "the two good records")
        said = r.wait_for_event("bad_container", container="odd-no-port", id=no_port[:12])
        assert [e["level"] for e in said] == ["warning"]  # said once
        assert (f"container odd-no-port ({no_port[:12]}) treated as publishing nothing: host port of 80/tcp "
                "None is not a port number") in said[0]["message"]
        assert check.neighbour_changes() == []
        assert_log_is_clean(r)
    finally:
        odd.close()
