"""Diagnosis: when etcd fails, the retry line says why in etcd's terms, on real processes.

A three-member cluster that lost two members keeps answering on the third: reads served locally
still work, every write and every linearizable read waits out etcd's request timeout (7 s) and
fails with "request timed out" or "context deadline exceeded", which names nothing an operator
can act on. The member knows it has no leader (/v3/maintenance/status says "etcdserver: no
leader", /health answers 503), and the registrar's retry warning names that member and says so.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time

import pytest
import requests
import testbed
from invariant import assert_log_is_clean
from testbed import wait_until

pytestmark = pytest.mark.integration

_clusters = itertools.count(1)


def has_no_leader(member: testbed.EtcdServer) -> bool:
    """What the member itself says: its status names no leader (etcd's gateway leaves the field
    out when it is 0, and lists "etcdserver: no leader" among its errors)."""
    try:
        status = member.http().post(f"{member.url}/v3/maintenance/status", json={}, timeout=2).json()
    except (requests.RequestException, ValueError):
        return False
    return not status.get("leader") or status["leader"] == "0"


def log_entries(registrar: testbed.Registrar) -> list[dict]:
    """The registrar's JSON log lines (LOG_FORMAT=json), each an object."""
    entries = []
    for line in registrar.log.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # a line being written
                entries.append(json.loads(line))
    return entries


@pytest.mark.parametrize(("version", "api"), [("3.4", 3), ("3.4", 2), ("3.5", 3)],
                         ids=["etcd3.4-v3", "etcd3.4-v2", "etcd3.5-v3"])
def test_a_member_without_a_leader_is_named(workdir, docker, own_registrar, version, api):
    cluster = testbed.EtcdCluster(workdir, f"nl{version.replace('.', '')}a{api}n{next(_clusters)}",
                                  version=version, v2=version == "3.4", api=api)
    try:
        cluster.start()
        survivor = cluster.members[0]
        for member in cluster.members[1:]:
            testbed.end(member.process)
        # a leader left alone steps down after an election timeout (check quorum); a follower
        # loses its leader as soon: either way the survivor says it has none within seconds
        wait_until(lambda: has_no_leader(survivor), 15, f"{survivor.url} to have no leader", interval=0.2)

        r = own_registrar(endpoint=survivor.endpoint, ttl=6, resync=5,
                          env={"ETCD_API": str(api), "LOG_FORMAT": "json"})
        started = time.monotonic()

        def named() -> list[dict]:
            return [entry for entry in log_entries(r) if entry.get("event") == "retry"
                    and survivor.url in entry.get("message", "") and "has no leader" in entry["message"]]
        try:
            found = wait_until(named, 30, "a retry warning naming the member without a leader", interval=0.2)
        except TimeoutError as exc:
            retries = [entry.get("message") for entry in log_entries(r) if entry.get("event") == "retry"]
            raise AssertionError(f"{exc}; the retry lines said:\n" + "\n".join(map(str, retries))
                                 + f"\nend of the log:\n{r.log[-3000:]}") from None
        took = time.monotonic() - started
        assert found[0]["level"] == "warning", found[0]
        assert took < 30
        assert r.process.poll() is None  # it keeps retrying: the member may find its peers again
        assert_log_is_clean(r)
    finally:
        cluster.stop()
