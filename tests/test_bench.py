"""A smoke run of the benchmark (N = 5 and 10, one run, both etcd APIs), so that it never rots.

Timings are not judged here (the machines are shared and noisy); what is judged is that every
measure ran on v2 (etcd 3.4) and on v3 (etcd 3.5.1 with its defaults) and that the correctness
figures hold: register.py and the floor wrote the same records (checked inside the benchmark), a
warm restart wrote nothing, no event was lost.
"""
from __future__ import annotations

import json

import pytest
from benchmark import Benchmark, Settings, start_servers

pytestmark = pytest.mark.integration


@pytest.fixture
def bench_servers(workdir):
    """The benchmark's two etcd servers, of its own: not the suite's (which has one flavour)."""
    servers = {}
    try:
        servers = start_servers(workdir, ["v2", "v3"])
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_benchmark_smoke_run(docker, bench_servers, workdir, tmp_path):
    bench = Benchmark(docker, bench_servers, workdir,
                      Settings(sizes=[5, 10], runs=1, idle=2, singles=3, burst=5, out=tmp_path))
    bench.run()
    text = bench.write()
    both = ("v2", "v3")
    expected = [(measure, n, api) for measure, apis in (
        ("cold sync", both), ("etcd requests, cold sync", both), ("cold sync, v3 / v2", ("v3 / v2",)),
        ("warm restart: time to in sync", both), ("warm restart: record writes", both), ("RSS at rest", both),
        ("CPU over 2 s idle", both), ("etcd writes at rest", both)) for n in (5, 10) for api in apis]
    expected += [(f"latency {phase} {q}", n, api) for phase, n in (
        ("start, one by one", 3), ("start, bursts", 5), ("die, one by one", 3), ("die, bursts", 5))
        for q in ("p50", "p90", "p99", "max") for api in both]
    expected += [(measure, "", api) for measure in ("scaling: cold sync 10 / 5", "scaling: RSS 10 / 5")
                 for api in both]
    assert [(row["measure"], row["n"], row["api"]) for row in bench.rows] == expected
    rows = {(row["measure"], row["n"], row["api"]): row for row in bench.rows}
    for api in both:
        assert rows[("warm restart: record writes", 10, api)]["register"] == 0
        assert rows[("etcd requests, cold sync", 10, api)]["register"] > 0
        assert [len(values) for values in bench.raw["latency"][api]["register"].values()] == [3, 5, 3, 5]
    assert rows[("etcd writes at rest", 10, "v3")]["register"] == 0  # keepalives are no writes
    # the floor on v3: one lease grant and one transaction (10 records < 128)
    assert bench.raw["requests"]["v3"][10]["floor"] == {"LeaseGrant": 1, "Txn": 1}
    assert all(row["register"] > 0 for row in bench.rows if row["measure"].startswith("latency"))
    assert text.splitlines()[2] == "| measure | N | API | register.py | floor | ratio | target | met |"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == bench.rows
