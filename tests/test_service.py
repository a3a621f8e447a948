"""register.py end to end: a subprocess against the suite's own dockerd and etcd.

Every assertion compares exact keys and exact value bytes read back from etcd. Expected values are
written out here from the contract; only what Docker picks at random (container ids, host ports
for -p 80 and -P) is read from Docker.
"""
from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import docker as docker_sdk
import etcd
import pytest
import testbed
from testbed import BASE_IMAGE, HOST, Registrar, read_tree, wait_until

import register

pytestmark = [pytest.mark.integration, pytest.mark.json_log]

IMAGE = "regtest::busybox:1"


def rec(cid: str, ip: str, public, private, kind: str = "tcp", image: str = IMAGE) -> str:
    return (f'{{"container":"{cid}","image":"{image}","ip":"{ip}","public_port":"{public}",'
            f'"private_port":"{private}","port_type":"{kind}"}}')


def val(*records: str) -> str:
    return "[" + ",".join(records) + "]"


def run(engine, *args: str) -> str:
    """docker run -d; returns the full container id."""
    return engine.out("run", "-d", *args)


def host_port(engine, cid: str, port: str = "80/tcp") -> str:
    bindings = engine.inspect(cid)["NetworkSettings"]["Ports"][port]
    return next(b["HostPort"] for b in bindings if b["HostIp"] == "0.0.0.0")


def converge(client, key: str, expected: dict, registrar: Registrar | None = None, timeout: float = 30):
    """Wait until the subtree at `key` is exactly `expected`; fail with the difference."""
    deadline = time.monotonic() + timeout
    while True:
        actual = read_tree(client, key)
        if actual == expected:
            return
        if time.monotonic() > deadline:
            missing = {k: v for k, v in expected.items() if actual.get(k) != v}
            extra = {k: v for k, v in actual.items() if expected.get(k) != v}
            log = registrar.log[-4000:] if registrar else ""
            raise AssertionError(f"{key} did not converge in {timeout} s\nmissing or wrong: "
                                 f"{json.dumps(missing, indent=1)}\nunexpected: "
                                 f"{json.dumps(extra, indent=1)}\nregister.py log:\n{log}")
        time.sleep(0.05)


def index_of(client, key: str) -> int:
    return client.revision(key)


# -- what gets registered ---------------------------------------------------------------------

def test_wildcard_bindings_twins_merged_udp_and_several_ports(docker, client, registrar, prefix):
    web = run(docker, "--name", "web", "-p", "80", "-p", "53/udp", BASE_IMAGE)
    several = run(docker, "--name", "several", "-p", "8443:443", "-p", "8180:80", "-p", "9000:9000/udp",
                  "-p", "8181:80", "-p", "5353:53/udp", "-p", "5354:53", BASE_IMAGE)
    run(docker, "--name", "quiet", BASE_IMAGE)  # exposes 80, publishes nothing
    r = registrar()
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{web}": val(
            rec(web, HOST, host_port(docker, web, "53/udp"), 53, "udp"),
            rec(web, HOST, host_port(docker, web), 80)),
        f"{prefix}/{HOST}/{IMAGE}/{several}": val(
            rec(several, HOST, 5354, 53), rec(several, HOST, 5353, 53, "udp"),
            rec(several, HOST, 8180, 80), rec(several, HOST, 8181, 80),
            rec(several, HOST, 8443, 443), rec(several, HOST, 9000, 9000, "udp")),
    }, r)
    assert sorted(e["container"] for e in r.events("registered")) == ["several", "web"]  # not quiet
    assert f"registered web ({web[:12]}) image regtest/busybox:1 ports 53/udp={HOST}:" in r.log


def test_specific_addresses_loopback_only_and_publish_all(docker, client, registrar, prefix):
    specific = run(docker, "-p", f"{testbed.SPECIFIC_IPV4}:8080:80", "-p", "127.0.0.1:8081:80",
                   "-p", "[::1]:8082:80", "-p", f"[{testbed.SPECIFIC_IPV6}]:8083:80", BASE_IMAGE)
    run(docker, "-p", "127.0.0.1:8084:80", BASE_IMAGE)  # loopback only: no key
    publish_all = run(docker, "-P", "--expose", "9090", "--expose", "7070/udp", BASE_IMAGE)
    r = registrar()
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{specific}": val(
            rec(specific, testbed.SPECIFIC_IPV4, 8080, 80), rec(specific, testbed.SPECIFIC_IPV6, 8083, 80)),
        f"{prefix}/{HOST}/{IMAGE}/{publish_all}": val(
            rec(publish_all, HOST, host_port(docker, publish_all), 80),
            rec(publish_all, HOST, host_port(docker, publish_all, "7070/udp"), 7070, "udp"),
            rec(publish_all, HOST, host_port(docker, publish_all, "9090/tcp"), 9090)),
    }, r)


def test_host_network_mode_publishes_exposed_ports_and_ipv6_host_ip(docker, client, registrar, prefix):
    host6 = "fd00:99::1"
    cid = run(docker, "--network", "host", "--expose", "8090/udp", BASE_IMAGE, "httpd", "-f", "-p", "8099")
    r = registrar(host="FD00:99:0::1")  # written in canonical form
    converge(client, f"{prefix}/{host6}", {
        f"{prefix}/{host6}/{IMAGE}/{cid}": val(rec(cid, host6, 80, 80), rec(cid, host6, 8090, 8090, "udp")),
    }, r)


def test_image_names(docker, client, registrar, prefix):
    docker.docker("tag", BASE_IMAGE, "example.org:5000/team/app:1.2")
    docker.docker("tag", BASE_IMAGE, f"{testbed.REGISTRY}/a/b/c/app:latest")
    docker.docker("tag", BASE_IMAGE, f"{testbed.REGISTRY}/team/app:1.2")
    digest_reference = docker.push(f"{testbed.REGISTRY}/team/app:1.2")
    image_id = docker.out("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    short_id = image_id.split(":", 1)[1][:12]
    cases = {  # reference given to docker run -> image part of the key
        "example.org:5000/team/app:1.2": "example.org:5000::team::app:1.2",
        f"{testbed.REGISTRY}/a/b/c/app": f"{testbed.REGISTRY}::a::b::c::app:latest",
        digest_reference: digest_reference.replace("/", "::"),
        short_id: f"{short_id}:latest",
        image_id: image_id,
    }
    expected = {}
    for number, (reference, image_part) in enumerate(cases.items()):
        cid = run(docker, "-p", f"{8200 + number}:80", reference)
        expected[f"{prefix}/{HOST}/{image_part}/{cid}"] = val(
            rec(cid, HOST, 8200 + number, 80, image=image_part))
    assert digest_reference.startswith(f"{testbed.REGISTRY}/team/app@sha256:")
    converge(client, f"{prefix}/{HOST}", expected, registrar())


def test_records_from_the_container_list_equal_those_from_inspect(docker):
    """A full reconcile builds records from one list request; they must be the inspect's, exactly."""
    docker.docker("tag", BASE_IMAGE, "example.org:5000/team/app:1.2")
    docker.docker("tag", BASE_IMAGE, f"{testbed.REGISTRY}/a/b/app")
    docker.docker("tag", BASE_IMAGE, f"{testbed.REGISTRY}/team/app:1.2")
    docker.docker("tag", BASE_IMAGE, "regtest/moved:1")
    digest_reference = docker.push(f"{testbed.REGISTRY}/team/app:1.2")
    image_id = docker.out("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE)
    from_list = [
        run(docker, "-p", "80", "-p", "53/udp", BASE_IMAGE),
        run(docker, "-p", "8443:443", "-p", "8180:80", "-p", "8181:80", "-p", "5353:53/udp", BASE_IMAGE),
        run(docker, "-p", f"{testbed.SPECIFIC_IPV4}:8080:80", "-p", "127.0.0.1:8081:80",
            "-p", "[::1]:8082:80", "-p", f"[{testbed.SPECIFIC_IPV6}]:8083:80", BASE_IMAGE),
        run(docker, "-p", "127.0.0.1:8084:80", BASE_IMAGE),
        run(docker, "-P", "--expose", "9090", "--expose", "7070/udp", BASE_IMAGE),
        run(docker, BASE_IMAGE),
        run(docker, "-p", "80", "example.org:5000/team/app:1.2"),
        run(docker, "-p", "80", f"{testbed.REGISTRY}/a/b/app"),
        run(docker, "-p", "80", digest_reference),
        run(docker, "-p", "80", image_id.split(":", 1)[1][:12]),
    ]
    paused = run(docker, "-p", "80", BASE_IMAGE)
    docker.docker("pause", paused)
    from_list.append(paused)
    moved = run(docker, "-p", "80", "regtest/moved:1")
    docker.docker("commit", from_list[0], "regtest/moved:1")  # the tag now names another image
    host_mode = run(docker, "--network", "host", "--expose", "8090", BASE_IMAGE, "httpd", "-f", "-p", "8098")
    inspected = [run(docker, "-p", "80", image_id), moved, host_mode]
    api = docker_sdk.APIClient(base_url=docker.host, version="auto")
    summaries = {summary["Id"]: summary for summary in api.containers()}
    assert summaries.keys() == set(from_list + inspected)
    for cid in from_list:
        listed = register.inspect_from_summary(summaries[cid])
        assert listed is not None, summaries[cid]
        assert register.desired_entry(listed, HOST, "/p") == \
            register.desired_entry(api.inspect_container(cid), HOST, "/p"), summaries[cid]
    assert [register.inspect_from_summary(summaries[cid]) for cid in inspected] == [None] * 3
    assert summaries[moved]["Image"] == summaries[moved]["ImageID"]  # what the list shows for it


# -- lifecycle --------------------------------------------------------------------------------

def test_start_registers_die_removes_and_prunes_the_image_directory(docker, client, registrar, prefix):
    r = registrar()
    r.wait_for_event("connected")
    cid = run(docker, "--name", "late", "-p", "8300:80", BASE_IMAGE)
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8300, 80))}, r)
    docker.docker("stop", "-t", "0", cid)
    converge(client, f"{prefix}/{HOST}", {}, r)
    assert client.host_present(f"{prefix}/{HOST}")  # the host stays listed while its registrar lives
    if client.api == 2:
        top = client.read(f"{prefix}/{HOST}", recursive=True)
        assert top.dir and list(top.get_subtree()) == [top]  # image directory pruned
    assert (f"removed late ({cid[:12]}) image regtest/busybox:1 ports 80/tcp={HOST}:8300: "
            "container stopped or gone") in r.log


def test_containers_that_die_within_milliseconds_leave_nothing(docker, client, registrar, prefix):
    r = registrar(resync=1)
    r.wait_for_event("connected")
    for _ in range(5):
        run(docker, "-p", "80", BASE_IMAGE, "true")
    sentinel = run(docker, "-p", "8301:80", BASE_IMAGE)
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{sentinel}": val(rec(sentinel, HOST, 8301, 80))}, r)
    r.wait_for_event("reconciled", count=len(r.events("reconciled")) + 1)  # and it stays so after a resync
    assert read_tree(client, f"{prefix}/{HOST}") == \
        {f"{prefix}/{HOST}/{IMAGE}/{sentinel}": val(rec(sentinel, HOST, 8301, 80))}


def test_docker_restart_reregisters_with_the_new_ports(docker, client, registrar, prefix):
    r = registrar()
    r.wait_for_event("connected")
    cid = run(docker, "-P", BASE_IMAGE)
    key = f"{prefix}/{HOST}/{IMAGE}/{cid}"
    converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, host_port(docker, cid), 80))}, r)
    docker.docker("restart", "-t", "0", cid)
    converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, host_port(docker, cid), 80))}, r)


def test_rm_force_while_running_removes_the_key(docker, client, registrar, prefix):
    r = registrar()
    r.wait_for_event("connected")
    keep = run(docker, "-p", "8302:80", BASE_IMAGE)
    gone = run(docker, "-p", "8303:80", BASE_IMAGE)
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{keep}": val(rec(keep, HOST, 8302, 80)),
        f"{prefix}/{HOST}/{IMAGE}/{gone}": val(rec(gone, HOST, 8303, 80))}, r)
    docker.docker("rm", "-f", gone)
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{keep}": val(rec(keep, HOST, 8302, 80))}, r)


def test_a_container_labelled_register_ignore_is_never_registered(docker, client, registrar, prefix):
    # one started before the service (the full reconcile, from the container list), one after (an event)
    before = run(docker, "--name", "quiet-before", "--label", "register.ignore=true", "-p", "8304:80",
                 BASE_IMAGE)
    seen = run(docker, "--name", "seen", "--label", "register.ignore=false", "-p", "8305:80", BASE_IMAGE)
    r = registrar(resync=1)
    r.wait_for_event("connected")
    after = run(docker, "--name", "quiet-after", "--label", "register.ignore=TRUE", "-p", "8306:80",
                BASE_IMAGE)
    sentinel = run(docker, "--name", "sentinel", "-p", "8307:80", BASE_IMAGE)
    expected = {f"{prefix}/{HOST}/{IMAGE}/{seen}": val(rec(seen, HOST, 8305, 80)),
                f"{prefix}/{HOST}/{IMAGE}/{sentinel}": val(rec(sentinel, HOST, 8307, 80))}
    converge(client, f"{prefix}/{HOST}", expected, r)
    r.wait_for_event("reconciled", count=len(r.events("reconciled")) + 3)  # three resyncs more
    assert read_tree(client, f"{prefix}/{HOST}") == expected
    # said once each at info, not at every resync
    for name, cid in (("quiet-before", before), ("quiet-after", after)):
        line = f"container {name} ({cid[:12]}) not registered: labelled register.ignore=true"
        said = [(e["level"], e["id"], e["message"]) for e in r.events("ignored", container=name)]
        assert said == [("info", cid[:12], line)], r.log


def test_the_same_image_many_times(docker, client, registrar, prefix):
    cids = [run(docker, "-p", f"{8310 + n}:80", BASE_IMAGE) for n in range(12)]
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8310 + n, 80)) for n, cid in enumerate(cids)
    }, registrar())


def test_paused_containers_stay_registered_through_resyncs(docker, client, registrar, prefix):
    cid = run(docker, "-p", "8320:80", BASE_IMAGE)
    docker.docker("pause", cid)
    r = registrar(resync=1)
    key = f"{prefix}/{HOST}/{IMAGE}/{cid}"
    converge(client, f"{prefix}/{HOST}", {key: val(rec(cid, HOST, 8320, 80))}, r)
    index = index_of(client, key)
    r.wait_for_event("reconciled", count=len(r.events("reconciled")) + 2, timeout=15)  # two resyncs
    assert index_of(client, key) == index


def test_startup_removes_stale_keys_keeps_right_ones_and_never_touches_other_hosts(
        docker, client, registrar, prefix):
    running = run(docker, "-p", "8330:80", BASE_IMAGE)
    missing = run(docker, "-p", "8331:80", BASE_IMAGE)
    right_key = f"{prefix}/{HOST}/{IMAGE}/{running}"
    if client.api == 2:
        client.write(f"{prefix}/{HOST}", None, dir=True, ttl=60)
    client.put(right_key, val(rec(running, HOST, 8330, 80)))
    stale = {  # this host's: a container that no longer exists, odd leftovers
        f"{prefix}/{HOST}/{IMAGE}/{'d' * 64}": val(rec("d" * 64, HOST, 1234, 80)),
        f"{prefix}/{HOST}/old::image:2/{'e' * 64}": "[]",
        f"{prefix}/{HOST}/not-a-record": "x",
        f"{prefix}/{HOST}/{IMAGE}/{'f' * 64}/deeper": "x",
    }
    others = {  # other hosts', including one whose address starts with the same digits
        f"{prefix}/10.99.0.11/{IMAGE}/{'a' * 64}": val(rec("a" * 64, "10.99.0.11", 80, 80)),
        f"{prefix}/10.99.0.10/{IMAGE}/{'b' * 64}": val(rec("b" * 64, "10.99.0.10", 80, 80)),
        f"{prefix}/10.99.0.1x": "not a host",
        f"{prefix}-other/{HOST}/{IMAGE}/{'c' * 64}": "[]",
    }
    for key, value in {**stale, **others}.items():
        client.put(key, value)
    other_indexes = {key: index_of(client, key) for key in others}
    right_index = index_of(client, right_key)

    r = registrar()
    converge(client, f"{prefix}/{HOST}", {
        right_key: val(rec(running, HOST, 8330, 80)),
        f"{prefix}/{HOST}/{IMAGE}/{missing}": val(rec(missing, HOST, 8331, 80))}, r)
    r.wait_for_event("reconciled")
    assert {key: client.get(key) for key in others} == others
    assert {key: index_of(client, key) for key in others} == other_indexes
    if client.api == 2:
        assert index_of(client, right_key) == right_index  # not rewritten
        with pytest.raises(etcd.EtcdKeyNotFound):
            client.read(f"{prefix}/{HOST}/old::image:2")  # emptied image directories go too
        assert "1 written, 4 removed, 1 already right" in r.log
    else:  # right, but on no lease: it would outlive the host, so it is written again on the lease
        lease = client.lease_of(f"{prefix}/{HOST}")
        assert lease and client.lease_of(right_key) == lease
        assert "2 written, 4 removed, 0 already right" in r.log
    assert (f"removed stale record of dddddddddddd image {IMAGE} ports 80/tcp={HOST}:1234 "
            f"({prefix}/{HOST}/{IMAGE}/{'d' * 64}): no such running container") in r.log
    assert f"removed stale key {prefix}/{HOST}/not-a-record: no such running container" in r.log


def test_a_restart_of_the_service_writes_nothing(docker, client, registrar, prefix):
    cids = [run(docker, "-p", f"{8340 + n}:80", BASE_IMAGE) for n in range(3)]
    expected = {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8340 + n, 80))
                for n, cid in enumerate(cids)}
    first = registrar()
    converge(client, f"{prefix}/{HOST}", expected, first)
    assert first.stop() == 0
    assert read_tree(client, f"{prefix}/{HOST}") == expected  # records stay on a plain stop
    etcd_index = client.head()
    second = registrar()
    second.wait_for_event("reconciled")
    assert "0 written, 0 removed, 3 already right" in second.log
    assert client.changes_since(prefix, etcd_index) == 0  # nothing at all changed under the prefix
    if client.api == 3:
        assert "adopted lease" in second.log


def test_sigterm_stops_within_two_seconds_and_deregister_on_exit_deletes_the_subtree(
        docker, client, registrar, prefix):
    cid = run(docker, "-p", "8350:80", BASE_IMAGE)
    expected = {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8350, 80))}
    plain = registrar()
    converge(client, f"{prefix}/{HOST}", expected, plain)
    assert plain.stop(signal.SIGTERM, timeout=2) == 0
    assert read_tree(client, f"{prefix}/{HOST}") == expected
    leaving = registrar(args=("--deregister-on-exit",))
    leaving.wait_for_event("reconciled")
    assert leaving.stop(signal.SIGINT, timeout=2) == 0
    assert not client.host_present(f"{prefix}/{HOST}") and read_tree(client, f"{prefix}/{HOST}") == {}
    if client.api == 2:
        assert client.read(prefix).dir  # only this host's subtree went


def test_host_directory_has_a_ttl_refreshed_and_restored_when_deleted(docker, client, registrar, prefix):
    cid = run(docker, "-p", "8360:80", BASE_IMAGE)
    expected = {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8360, 80))}
    r = registrar(ttl=6)
    converge(client, f"{prefix}/{HOST}", expected, r)
    assert 0 < client.liveness(f"{prefix}/{HOST}") <= 6
    time.sleep(7)  # longer than the TTL: only the refreshes keep it
    assert read_tree(client, f"{prefix}/{HOST}") == expected
    if client.api == 2:
        client.delete(f"{prefix}/{HOST}")  # an operator's mistake
        lost = "had expired or lost its TTL; re-registering everything"
    else:
        lease = client.lease_of(f"{prefix}/{HOST}")
        client.revoke(lease)  # an operator's mistake: every key on it goes
        lost = re.compile(rf"lease {lease:x} of {re.escape(prefix)}/{HOST} had expired or been revoked "
                          r"\(its keepalive was answered .+\); re-registering everything on new lease "
                          r"[0-9a-f]+")
    converge(client, f"{prefix}/{HOST}", expected, r, timeout=10)  # the next refresh (every 2 s) sees it
    wait_until(lambda: client.host_present(f"{prefix}/{HOST}"), 5, "the host key")
    assert 0 < client.liveness(f"{prefix}/{HOST}") <= 6
    assert lost in r.log if isinstance(lost, str) else lost.search(r.log)


@pytest.mark.v2_only
def test_without_ttl_the_empty_host_directory_goes(docker, client, registrar, prefix):
    r = registrar(ttl=0)
    r.wait_for_event("connected")
    cid = run(docker, "-p", "8370:80", BASE_IMAGE)
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8370, 80))}, r)
    assert client.read(f"{prefix}/{HOST}").ttl is None
    docker.docker("rm", "-f", cid)
    wait_until(lambda: not read_tree(client, prefix) and _missing(client, f"{prefix}/{HOST}"), 20,
               "the host directory to go")
    time.sleep(1)
    assert _missing(client, f"{prefix}/{HOST}")  # and it stays gone
    assert len(r.events("reconciled")) == 1  # no reconcile loop over the missing directory


def _missing(client, key: str) -> bool:
    try:
        client.read(key)
        return False
    except etcd.EtcdKeyNotFound:
        return True


def test_drift_is_repaired_by_the_periodic_resync(docker, client, registrar, prefix):
    a = run(docker, "-p", "8380:80", BASE_IMAGE)
    b = run(docker, "-p", "8381:80", BASE_IMAGE)
    expected = {f"{prefix}/{HOST}/{IMAGE}/{a}": val(rec(a, HOST, 8380, 80)),
                f"{prefix}/{HOST}/{IMAGE}/{b}": val(rec(b, HOST, 8381, 80))}
    r = registrar(resync=2)
    converge(client, f"{prefix}/{HOST}", expected, r)
    client.delete(f"{prefix}/{HOST}/{IMAGE}/{a}")
    client.put(f"{prefix}/{HOST}/{IMAGE}/{a}/junk", "a directory where a record belongs")
    client.put(f"{prefix}/{HOST}/{IMAGE}/{b}", "wrong")
    client.put(f"{prefix}/{HOST}/{IMAGE}/{'9' * 64}", "stale")
    client.put(f"{prefix}/{HOST}/other::image:1", "a value where a directory belongs")
    converge(client, f"{prefix}/{HOST}", expected, r, timeout=10)
    client.delete(f"{prefix}/{HOST}/{IMAGE}")  # v2: the whole image directory
    for key in expected:  # v3 has no directories: the records one by one
        client.delete(key)
    client.put(f"{prefix}/{HOST}/{IMAGE}", "a value where a directory belongs")
    converge(client, f"{prefix}/{HOST}", expected, r, timeout=10)
    if client.api == 3:  # an operator's key, right but on no lease: on the lease again
        client.put(f"{prefix}/{HOST}/{IMAGE}/{a}", expected[f"{prefix}/{HOST}/{IMAGE}/{a}"])
        lease = client.lease_of(f"{prefix}/{HOST}")
        wait_until(lambda: client.lease_of(f"{prefix}/{HOST}/{IMAGE}/{a}") == lease, 10,
                   "the record to be back on the lease")
    assert "Traceback" not in r.log and not [e for e in r.entries() if "traceback" in e], r.log  # no bug


def test_waits_for_etcd_with_backoff_then_registers(docker, client, registrar, prefix, new_etcd):
    cid = run(docker, "-p", "8390:80", BASE_IMAGE)
    late = new_etcd("late")
    r = registrar(endpoint=late.endpoint)
    r.wait_for_event("retry", cause=f"etcd at {late.url} failed: connection refused", pending=0)
    late.start()
    try:
        converge(late.store(), f"{prefix}/{HOST}",
                 {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8390, 80))}, r)
        r.wait_for_event("recovered")
    finally:
        late.stop()


def test_follows_events_across_a_dockerd_restart(docker, client, registrar, prefix):
    survivor = run(docker, "--restart", "always", "-P", BASE_IMAGE)
    casualty = run(docker, "-p", "8395:80", BASE_IMAGE)
    r = registrar()
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{survivor}": val(rec(survivor, HOST, host_port(docker, survivor), 80)),
        f"{prefix}/{HOST}/{IMAGE}/{casualty}": val(rec(casualty, HOST, 8395, 80))}, r)
    docker.stop_daemon()
    r.wait_for_event("disconnected")
    docker.start_daemon()
    wait_until(lambda: docker.inspect(survivor)["State"]["Running"], 30, "the survivor to restart")
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{survivor}": val(rec(survivor, HOST, host_port(docker, survivor), 80)),
    }, r)
    r.wait_for_event("reconnected")


@pytest.mark.slow
def test_a_hundred_containers_started_at_once_then_killed_at_once(docker, client, registrar, prefix):
    r = registrar()
    r.wait_for_event("connected")
    with ThreadPoolExecutor(8) as pool:
        cids = list(pool.map(lambda n: run(docker, "-p", f"{9000 + n}:80", BASE_IMAGE), range(100)))
    converge(client, f"{prefix}/{HOST}", {
        f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 9000 + n, 80)) for n, cid in enumerate(cids)
    }, r, timeout=60)
    docker.docker("kill", *cids, timeout=300)
    converge(client, f"{prefix}/{HOST}", {}, r, timeout=60)
    removed = r.wait_for_event("removed", count=100, timeout=10)
    assert len(removed) == 100 and all(e["message"].endswith(": container stopped or gone") for e in removed)
    assert not [e for e in r.entries() if e["level"] in ("warning", "error")], r.log


def test_the_readme_run_command_starts_a_local_etcd_and_registers(docker, workdir):
    cid = run(docker, "-p", "8396:80", BASE_IMAGE)
    env = {**docker.env, "HOST_IP": "10.99.0.77", "LOCAL_ETCD_DIR": str(workdir / "run-etcd")}
    env.pop("ETCD_ENDPOINT", None)
    script = Registrar(workdir, env, name="scripts-run")
    script.process = testbed.spawn(["bash", str(testbed.ROOT / "scripts" / "run")], script.log_path, env=env)
    try:
        script.wait_for_log("started a local etcd at http://127.0.0.1:", timeout=120)
        url = script.log.split("started a local etcd at ")[1].split(" ")[0]
        local = etcd.Client(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), read_timeout=5)
        converge(local, "/registered/10.99.0.77", {
            f"/registered/10.99.0.77/{IMAGE}/{cid}": val(rec(cid, "10.99.0.77", 8396, 80))}, script)
        assert script.stop(signal.SIGTERM, timeout=5) == 0
        with pytest.raises(etcd.EtcdConnectionFailed):  # its etcd stopped with it
            local.read("/")
    finally:
        script.kill()


def test_an_etcd_cluster_list_moves_past_a_dead_member(docker, client, registrar, prefix, etcd_server):
    cid = run(docker, "-p", "8397:80", BASE_IMAGE)
    dead = f"127.0.0.1:{testbed.free_port()}"
    r = registrar(endpoint=f"{dead},{etcd_server.endpoint}")
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8397, 80))}, r)
    assert f"etcd at http://{dead} failed: connection refused" in r.log


def test_json_log_lines(docker, client, registrar, prefix):
    cid = run(docker, "--name", "jsonlog", "-p", "8398:80", BASE_IMAGE)
    r = registrar(args=("--log-format", "json"))
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8398, 80))}, r)
    r.wait_for_event("reconciled")
    lines = [json.loads(line) for line in r.log.splitlines()]
    registered = [line for line in lines if line.get("event") == "registered"]
    assert len(registered) == 1
    line = registered[0]
    assert set(line) == {"time", "level", "message", "event", "container", "id", "image", "ports", "key"}
    assert (line["level"], line["container"], line["id"], line["image"], line["ports"], line["key"]) == (
        "info", "jsonlog", cid[:12], "regtest/busybox:1", f"80/tcp={HOST}:8398",
        f"{prefix}/{HOST}/{IMAGE}/{cid}")
    assert line["message"] == \
        f"registered jsonlog ({cid[:12]}) image regtest/busybox:1 ports 80/tcp={HOST}:8398"


def test_writes_missed_while_etcd_is_down_are_made_when_it_returns(docker, registrar, prefix, new_etcd):
    own = new_etcd("outage")
    own.start()
    try:
        client = own.store()
        leaving = run(docker, "-p", "8401:80", BASE_IMAGE)
        r = registrar(endpoint=own.endpoint)
        converge(client, f"{prefix}/{HOST}",
                 {f"{prefix}/{HOST}/{IMAGE}/{leaving}": val(rec(leaving, HOST, 8401, 80))}, r)
        own.stop()
        arriving = run(docker, "-p", "8402:80", BASE_IMAGE)
        docker.docker("stop", "-t", "0", leaving)
        r.wait_for_event("retry", pending=2)
        own.start()  # same data directory: the old record is still there
        converge(client, f"{prefix}/{HOST}",
                 {f"{prefix}/{HOST}/{IMAGE}/{arriving}": val(rec(arriving, HOST, 8402, 80))}, r)
        assert "failed: connection refused; 2 container(s) pending; retrying in" in r.log
    finally:
        own.stop()


def test_waits_for_the_docker_socket_then_registers(docker, client, registrar, prefix, workdir, api):
    cid = run(docker, "-p", "8403:80", BASE_IMAGE)
    later = workdir / f"later-v{api}.sock"
    r = registrar(docker_host=f"unix://{later}")
    waiting = r.wait_for_event("retry", cause=f"Docker at unix://{later} failed: no such file or directory")
    assert waiting[0]["message"].startswith(f"waiting for Docker: {waiting[0]['cause']}; retrying in ")
    later.symlink_to(docker.socket)  # the engine's socket appears
    converge(client, f"{prefix}/{HOST}",
             {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8403, 80))}, r)
    assert r.wait_for_event("connected")[0]["message"] == f"connected to Docker at unix://{later}"


def test_sigterm_exits_within_two_seconds_while_etcd_stalls(docker, registrar, prefix, new_etcd):
    own = new_etcd("stalled")
    own.start()
    try:
        first = run(docker, "-p", "8404:80", BASE_IMAGE)
        plain = registrar(endpoint=own.endpoint)
        leaving = registrar(endpoint=own.endpoint, host="10.99.0.2", args=("--deregister-on-exit",))
        converge(own.store(), f"{prefix}/{HOST}",
                 {f"{prefix}/{HOST}/{IMAGE}/{first}": val(rec(first, HOST, 8404, 80))}, plain)
        converge(own.store(), f"{prefix}/10.99.0.2",
                 {f"{prefix}/10.99.0.2/{IMAGE}/{first}": val(rec(first, "10.99.0.2", 8404, 80))}, leaving)
        own.process.send_signal(signal.SIGSTOP)  # etcd stalls: requests hang until their timeout
        run(docker, "-p", "8405:80", BASE_IMAGE)  # a put that hangs
        time.sleep(1)
        assert plain.stop(signal.SIGTERM, timeout=2) == 0
        assert leaving.stop(signal.SIGTERM, timeout=2) == 0
        assert (f"could not delete {prefix}/10.99.0.2/ on exit: etcd did not answer in time; "
                "it expires with its TTL") in leaving.log
    finally:
        own.process.send_signal(signal.SIGCONT)
        own.stop()


def test_etcd_over_tls_with_a_client_certificate(docker, registrar, prefix, workdir, new_etcd, api):
    tls = testbed.make_tls(workdir / f"tls-v{api}")
    secure = new_etcd("tls", tls=tls)
    secure.start()
    try:
        cid = run(docker, "-p", "8406:80", BASE_IMAGE)
        r = registrar(endpoint=secure.url, args=(
            "--etcd-ca-file", str(tls["ca"]), "--etcd-cert-file", str(tls["client"]),
            "--etcd-key-file", str(tls["client-key"])))
        converge(secure.store(), f"{prefix}/{HOST}",
                 {f"{prefix}/{HOST}/{IMAGE}/{cid}": val(rec(cid, HOST, 8406, 80))}, r)
        starting = r.events("starting")
        assert len(starting) == 1 and f"etcd {secure.url} (v{api} API), subtree" in starting[0]["message"]
        untrusted = registrar(endpoint=secure.url, host="10.99.0.3")  # no CA: the server is not trusted
        untrusted.wait_for_event("retry", cause=lambda cause: cause.startswith(
            f"etcd at {secure.url} failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "unable to get local issuer certificate"))
        assert "0 container(s) pending; retrying in" in untrusted.log
    finally:
        secure.stop()
