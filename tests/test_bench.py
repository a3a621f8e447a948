"""A smoke run of the benchmark (N = 10, one run), so that it never rots.

Timings are not judged here (the machines are shared and noisy); what is judged is that every
measure ran and that the correctness figures hold: register.py and the floor wrote the same
records (checked inside the benchmark), a warm restart wrote nothing, no event was lost.
"""
from __future__ import annotations

import json

import pytest
from benchmark import Benchmark, Settings

pytestmark = pytest.mark.integration


def test_benchmark_smoke_run(docker, etcd_server, workdir, tmp_path):
    bench = Benchmark(docker, etcd_server, workdir,
                      Settings(sizes=[5, 10], runs=1, idle=2, singles=3, burst=5, out=tmp_path))
    bench.run()
    text = bench.write()
    measures = [row["measure"] for row in bench.rows]
    assert measures == [
        "cold sync", "warm restart: time to in sync", "warm restart: etcd writes", "RSS at rest",
        "CPU over 2 s idle", "etcd writes at rest"] * 2 + [
        f"latency {phase} {q}" for phase in ("start, one by one", "start, bursts", "die, one by one",
                                             "die, bursts") for q in ("p50", "p90", "p99", "max")] + [
        "scaling: cold sync 10 / 5", "scaling: RSS 10 / 5"]
    rows = {(row["measure"], row["n"]): row for row in bench.rows}
    assert rows[("warm restart: etcd writes", 10)]["register"] == 0
    assert all(row["register"] > 0 for row in bench.rows if row["measure"].startswith("latency"))
    assert [len(values) for values in bench.raw["latency"]["register"].values()] == [3, 5, 3, 5]
    assert text.splitlines()[2] == "| measure | N | register.py | floor | ratio | target | met |"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == bench.rows
