"""What register.py costs and how it grows, measured side by side with the floor (bench/floor.py),
on both etcd APIs in one run.

    bench/run [--sizes 100,500] [--runs 5] [--idle 60] [--singles 20] [--burst 50] [--apis v2,v3]
              [--out DIR]

Starts a dockerd of its own and two etcd servers (tests/testbed.py): Debian's etcd 3.4 with
--enable-v2, which register.py speaks v2 to (ETCD_API=2, python-etcd), and etcd 3.5.1 started with
its defaults (v3 only), which register.py speaks v3 to (ETCD_API=3, etcd3gw through etcd's JSON
gateway). It creates N containers publishing a port, and prints one markdown table of medians, each
API's figures against its own floor (also written to DIR/results.md, with DIR/results.png and the
raw figures in DIR/results.json):

- cold sync: from spawning the process to the N-th record seen through an etcd watch, for
  register.py on an empty prefix and for the floor (one list call, then v2: N sequential puts;
  v3: one lease grant and N/128 transactions of puts on it); the runs of both APIs alternate;
- etcd requests of a cold sync, counted by etcd itself (its /metrics: v3, the gRPC calls its
  gateway made, `grpc_server_handled_total` by method; v2, its store's reads and writes);
- warm restart: register.py restarted with every record right: time to its "full reconcile" log
  line, and the records it wrote again, added or removed (each record's modifiedIndex /
  mod_revision before and after; v2 also refreshes the host directory's TTL once, no record);
- event latency: from Docker's event (`timeNano`) to the key's change arriving through an etcd
  watch, for starts one by one and in bursts, then for dies, against the floor's script;
- cost at rest (both APIs' registrars idle side by side): RSS, CPU seconds over the idle period,
  etcd writes per minute (etcd's index / revision; a v3 lease keepalive is no write).

Timings on a shared 2-core machine are noisy: they are medians of runs made in the same session,
and ratios to a floor measured alongside. None of this is a pass/fail test; a smoke run with
N = 5 and 10 is (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import docker
import etcd
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import testbed  # noqa: E402
from faults import rss_kib  # noqa: E402
from testbed import BASE_IMAGE, DockerEngine, EtcdServer, Registrar, end, wait_until  # noqa: E402

FLOOR = Path(__file__).resolve().parent / "floor.py"
HOST = "10.88.0.1"
TTL = 60
APIS = ("v2", "v3")
SERVERS = {"v2": {"version": "3.4", "v2": True}, "v3": {"version": "3.5", "v2": False}}
LABELS = {"v2": "v2, etcd 3.4", "v3": "v3, etcd 3.5.1"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode()


def unb64(data: str | None) -> str:
    return base64.b64decode(data or "").decode("utf-8", "surrogateescape")


def range_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def metrics(server: EtcdServer) -> dict[str, float]:
    """etcd's Prometheus counters, one entry per line (name with labels -> value)."""
    text = server.http().get(f"{server.url}/metrics", timeout=10).text
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, figure = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(figure)
    return found


def label(name: str, key: str) -> str:
    return name.split(f'{key}="', 1)[1].split('"', 1)[0]


class Watch:
    """A stream watch on one host's records; records (arrival ns, "set" | "delete", key) for each
    change of a key under `<prefix>/<HOST>/`. Subclasses open the stream and decode one line."""

    def __init__(self, response: requests.Response, start: str):
        self.changes: list[tuple[int, str, str]] = []
        self.start = start
        self._response = response
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # etcd sends each change as one HTTP chunk; read chunk by chunk (iter_lines would wait for
        # a buffer of 512 bytes to fill, and stamp changes late)
        pending = b""
        try:
            for chunk in self._response.raw.read_chunked(decode_content=False):
                arrived = time.time_ns()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in filter(None, lines):
                    self.changes.extend((arrived, action, key) for action, key
                                        in self.decode(json.loads(line)) if key.startswith(self.start))
        except Exception:
            return  # closed

    def decode(self, message: dict) -> list[tuple[str, str]]:
        raise NotImplementedError

    def first(self, action: str, container_id: str) -> int | None:
        return next((t for t, a, key in self.changes if a == action and key.endswith("/" + container_id)),
                    None)

    def distinct_sets(self) -> int:
        return len({key for _, action, key in self.changes if action == "set"})

    def close(self) -> None:
        # response.close() would block on the reader thread's lock: end the socket under it instead
        with contextlib.suppress(Exception):
            self._response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


class V2Watch(Watch):
    def __init__(self, server: EtcdServer, prefix: str):
        response = server.http().get(f"{server.url}/v2/keys{prefix}",
                                     params={"wait": "true", "recursive": "true", "stream": "true"},
                                     stream=True, timeout=(5, None))
        super().__init__(response, f"{prefix}/{HOST}/")

    def decode(self, message: dict) -> list[tuple[str, str]]:
        action = message["action"]
        return [("set" if action in ("set", "create", "update") else action, message["node"]["key"])]


class V3Watch(Watch):
    def __init__(self, server: EtcdServer, prefix: str):
        start = f"{prefix}/{HOST}/"
        response = server.http().post(f"{server.url}/v3/watch", json={"create_request": {
            "key": b64(start), "range_end": b64(range_end(start))}}, stream=True, timeout=(5, None))
        self._created = threading.Event()
        super().__init__(response, start)
        if not self._created.wait(10):
            raise RuntimeError("etcd's gateway did not create the watch")

    def decode(self, message: dict) -> list[tuple[str, str]]:
        result = message.get("result") or {}
        if result.get("created"):
            self._created.set()
        return [("delete" if event.get("type") == "DELETE" else "set", unb64(event["kv"]["key"]))
                for event in result.get("events") or []]


class Etcd:
    """One etcd server as the benchmark sees it, through the API register.py speaks to it."""

    api = ""

    def __init__(self, server: EtcdServer):
        self.server = server

    def watch(self, prefix: str) -> Watch:
        raise NotImplementedError

    def revision(self) -> int:
        """v2: etcd's index; v3: its revision. Either moves by one per write."""
        raise NotImplementedError

    def records(self, prefix: str) -> dict[str, str]:
        """Every record (key -> value) below `<prefix>/<HOST>/`."""
        raise NotImplementedError

    def drop(self, prefix: str) -> None:
        """Everything under `prefix`, so that nothing there expires later and counts as a write."""
        raise NotImplementedError

    def record_revisions(self, prefix: str) -> dict[str, int]:
        """key -> the revision (v2: modifiedIndex) of every record below `<prefix>/<HOST>/`: a
        record written again, added or removed changes this."""
        raise NotImplementedError

    def requests(self) -> dict[str, float]:
        """etcd's counters of the requests it served (operation -> count)."""
        raise NotImplementedError


class EtcdV2(Etcd):
    api = "v2"

    def __init__(self, server: EtcdServer):
        super().__init__(server)
        self.client = etcd.Client(host="127.0.0.1", port=server.client_port, read_timeout=10)

    def watch(self, prefix: str) -> Watch:
        return V2Watch(self.server, prefix)

    def revision(self) -> int:
        return self.client.read("/").etcd_index

    def records(self, prefix: str) -> dict[str, str]:
        return testbed.read_tree(self.client, f"{prefix}/{HOST}")

    def drop(self, prefix: str) -> None:
        with contextlib.suppress(etcd.EtcdKeyNotFound):
            self.client.delete(prefix, recursive=True, dir=True)

    def record_revisions(self, prefix: str) -> dict[str, int]:
        try:
            top = self.client.read(f"{prefix}/{HOST}", recursive=True)
        except etcd.EtcdKeyNotFound:
            return {}
        return {node.key: node.modifiedIndex for node in top.get_subtree() if not node.dir}

    def requests(self) -> dict[str, float]:
        # v2 requests are no gRPC calls: count the operations of etcd's v2 store
        return {label(name, "action"): value for name, value in metrics(self.server).items()
                if name.startswith(("etcd_debugging_store_reads_total{",
                                    "etcd_debugging_store_writes_total{"))}


class EtcdV3(Etcd):
    api = "v3"
    COUNTED = ("Range", "Txn", "Put", "DeleteRange", "LeaseGrant", "LeaseRevoke", "LeaseTimeToLive",
               "LeaseKeepAlive", "Authenticate")  # not Watch: the benchmark's own streams

    def __init__(self, server: EtcdServer):
        super().__init__(server)
        self.session = server.http()

    def post(self, path: str, body: dict) -> dict:
        answer = self.session.post(f"{self.server.url}/v3{path}", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def watch(self, prefix: str) -> Watch:
        return V3Watch(self.server, prefix)

    def revision(self) -> int:
        return int(self.post("/kv/range", {"key": b64("/"), "count_only": True})["header"]["revision"])

    def _range(self, start: str, **options) -> list[dict]:
        return self.post("/kv/range", {"key": b64(start), "range_end": b64(range_end(start)),
                                       **options}).get("kvs") or []

    def records(self, prefix: str) -> dict[str, str]:
        return {unb64(kv["key"]): unb64(kv.get("value")) for kv in self._range(f"{prefix}/{HOST}/")}

    def record_revisions(self, prefix: str) -> dict[str, int]:
        return {unb64(kv["key"]): int(kv["mod_revision"]) for kv in self._range(f"{prefix}/{HOST}/")}

    def drop(self, prefix: str) -> None:
        start = prefix + "/"
        for lease in {kv["lease"] for kv in self._range(start, keys_only=True) if int(kv.get("lease", 0))}:
            with contextlib.suppress(requests.HTTPError):  # expired already
                self.post("/lease/revoke", {"ID": lease})
        self.post("/kv/deleterange", {"key": b64(start), "range_end": b64(range_end(start))})

    def requests(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for name, value in metrics(self.server).items():
            if name.startswith("grpc_server_handled_total{") and label(name, "grpc_method") in self.COUNTED:
                method = label(name, "grpc_method")
                counts[method] = counts.get(method, 0) + value
        return counts


def request_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {name: int(after[name] - before.get(name, 0)) for name in sorted(after)
            if after[name] - before.get(name, 0) > 0}


class DockerEvents:
    """Docker's start and die events: container id -> timeNano, per action."""

    def __init__(self, engine: DockerEngine):
        self.times: dict[str, dict[str, int]] = {"start": {}, "die": {}}
        self._api = docker.APIClient(base_url=engine.host, version="auto")
        self._stream = self._api.events(decode=True, filters={"type": ["container"],
                                                               "event": ["start", "die"]})
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                self.times[event["Action"]].setdefault(event["id"], event["timeNano"])
        except Exception:
            return  # closed

    def close(self) -> None:
        self._stream.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_time(log: str, text: str) -> float:
    """Wall-clock time (s) of the first log line containing `text`."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


@dataclass
class Settings:
    sizes: list[int] = field(default_factory=lambda: [100, 500])
    runs: int = 5
    idle: float = 60
    singles: int = 20
    burst: int = 50
    out: Path = ROOT / "bench" / "results"
    apis: list[str] = field(default_factory=lambda: list(APIS))


class Benchmark:
    def __init__(self, engine: DockerEngine, servers: dict[str, EtcdServer], workdir: Path,
                 settings: Settings):
        """servers: "v2" -> an etcd serving v2 (3.4 with --enable-v2), "v3" -> one serving v3."""
        self.engine = engine
        self.workdir = workdir
        self.s = settings
        self.etcd: dict[str, Etcd] = {api: {"v2": EtcdV2, "v3": EtcdV3}[api](servers[api])
                                      for api in settings.apis}
        self.runs = 0
        self.rows: list[dict] = []
        self.raw: dict = {"sync": {api: {} for api in self.etcd}, "requests": {api: {} for api in self.etcd},
                          "latency": {}}

    # -- helpers --------------------------------------------------------------------------------

    def fresh_prefix(self) -> str:
        self.runs += 1
        return f"/bench-{os.getpid()}-{self.runs}"

    def env(self, api: str, prefix: str) -> dict:
        return {**self.engine.env, "ETCD_ENDPOINT": self.etcd[api].server.endpoint, "HOST_IP": HOST,
                "ETCD_API": api[1:], "REGISTER_PREFIX": prefix, "REGISTER_TTL": str(TTL),
                "REGISTER_RESYNC": "300"}

    def registrar(self, api: str, prefix: str) -> Registrar:
        return Registrar(self.workdir, self.env(api, prefix), name=f"bench-register-{api}").start()

    def floor(self, api: str, mode: str, prefix: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(FLOOR), mode, self.etcd[api].server.url, prefix, HOST,
                                 api[1:]], env=self.env(api, prefix), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def grow_to(self, n: int) -> None:
        missing = n - len(self.engine.out("ps", "-q").split())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: self.engine.out("run", "-d", "-p", "80", BASE_IMAGE), range(missing)))

    def row(self, measure: str, n: int | str, api: str, register: float, floor: float | None, unit: str,
            target: str, met: bool | None) -> None:
        self.rows.append({"measure": measure, "n": n, "api": api, "register": register, "floor": floor,
                          "unit": unit, "target": target, "met": met})

    # -- measures -------------------------------------------------------------------------------

    def synced(self, watch: Watch, n: int, process, timeout: float = 120) -> None:
        def done():
            if process.poll() not in (None, 0):
                raise RuntimeError(f"a process under test exited with {process.poll()}")
            return watch.distinct_sets() >= n
        wait_until(done, timeout, f"{n} records", interval=0.005)

    def cold_run(self, api: str, who: str, n: int) -> tuple[str, float, dict[str, int]]:
        """One cold sync on a fresh prefix: (prefix, seconds, etcd requests). register.py is
        stopped once in sync: its records stay (on v3, on its lease, for TTL seconds)."""
        store = self.etcd[api]
        prefix = self.fresh_prefix()
        watch = store.watch(prefix)
        before = store.requests()
        started = time.time_ns()
        try:
            if who == "register":
                process = self.registrar(api, prefix)
                self.synced(watch, n, process.process)
                process.wait_for_log("full reconcile", timeout=60)  # its last request is done
                after = store.requests()
                process.stop()
            else:
                process = self.floor(api, "cold", prefix)
                self.synced(watch, n, process)
                if process.wait(30) != 0:
                    raise RuntimeError(f"floor.py failed: {process.stdout.read().decode(errors='replace')}")
                after = store.requests()
            last_set = max(t for t, action, _ in watch.changes if action == "set")
        finally:
            watch.close()
        return prefix, (last_set - started) / 1e9, request_delta(before, after)

    def cold_sync(self, n: int) -> dict[str, str]:
        """Medians of cold syncs, the runs of register.py and of the floor on both APIs
        alternating; returns, per API, the last prefix register.py filled."""
        times = {api: {"register": [], "floor": []} for api in self.etcd}
        counts = {api: {} for api in self.etcd}
        used = {api: [] for api in self.etcd}
        filled = {}
        for _ in range(self.s.runs):
            for api in self.etcd:
                for who in ("register", "floor"):
                    prefix, seconds, counts[api][who] = self.cold_run(api, who, n)
                    times[api][who].append(seconds)
                    used[api].append(prefix)
                    if who == "register":
                        filled[api] = prefix
                    else:
                        floor_prefix = prefix
                store = self.etcd[api]
                ours, theirs = store.records(filled[api]), store.records(floor_prefix)
                if ({k.replace(filled[api], floor_prefix, 1): v for k, v in ours.items()} != theirs
                        or len(ours) != n):
                    raise RuntimeError(f"{api}: register.py and the floor did not write the same records")
        for api in self.etcd:
            for prefix in used[api]:  # what would expire later and count as writes at rest
                if prefix != filled[api]:
                    self.etcd[api].drop(prefix)
            register = statistics.median(times[api]["register"])
            floor = statistics.median(times[api]["floor"])
            self.raw["sync"][api][n] = times[api]
            self.raw["requests"][api][n] = counts[api]
            self.row("cold sync", n, api, register, floor, "s", "<= 1.3x floor", register / floor <= 1.3)
            self.row("etcd requests, cold sync", n, api, sum(counts[api]["register"].values()),
                     sum(counts[api]["floor"].values()), "", "", None)
        if set(self.etcd) == set(APIS):
            v2, v3 = (statistics.median(times[api]["register"]) for api in APIS)
            self.row("cold sync, v3 / v2", n, "v3 / v2", v3 / v2, None, "x", "<= 1x (v3 at least as fast)",
                     v3 <= v2)
        return filled

    def warm_restart(self, n: int, prefixes: dict[str, str]) -> dict[str, Registrar]:
        """Restarts on a right tree, the APIs alternating; returns the last registrar of each
        API, left running for the measures at rest."""
        times = {api: [] for api in self.etcd}
        writes = {api: [] for api in self.etcd}
        last = {}
        for run in range(self.s.runs):
            for api, store in self.etcd.items():
                before = store.record_revisions(prefixes[api])
                started = time.time()
                process = self.registrar(api, prefixes[api])
                process.wait_for_log("full reconcile", timeout=60)
                times[api].append(log_time(process.log, "full reconcile") - started)
                if "0 written, 0 removed" not in process.log:
                    raise RuntimeError(f"{api}: warm restart wrote records:\n{process.log}")
                after = store.record_revisions(prefixes[api])
                writes[api].append(sum(1 for key in before.keys() | after.keys()
                                       if before.get(key) != after.get(key)))
                if run < self.s.runs - 1:
                    process.stop()
                last[api] = process
        for api in self.etcd:
            median = statistics.median(times[api])
            self.row("warm restart: time to in sync", n, api, median, None, "s", "< 1 s", median < 1)
            # records only: v2 also refreshes the host directory's TTL once at start (a write that
            # wakes no watcher), so that an adopted directory with little time left does not expire
            self.row("warm restart: record writes", n, api, max(writes[api]), None, "writes", "0",
                     max(writes[api]) == 0)
        return last

    def at_rest(self, n: int, processes: dict[str, Registrar], prefixes: dict[str, str]) -> None:
        """The registrars of both APIs idle side by side over the same period."""
        pids = {api: process.process.pid for api, process in processes.items()}
        time.sleep(1)
        cpu = {api: cpu_seconds(pid) for api, pid in pids.items()}
        index = {api: store.revision() for api, store in self.etcd.items()}
        time.sleep(self.s.idle)
        for api, store in self.etcd.items():
            used = cpu_seconds(pids[api]) - cpu[api]
            writes = store.revision() - index[api]
            rss = rss_kib(pids[api]) / 1024
            self.row("RSS at rest", n, api, rss, None, "MiB", "< 60 MiB", rss < 60)
            share = 100 * used / self.s.idle
            self.row(f"CPU over {self.s.idle:g} s idle", n, api, share, None, "% of a core", "< 1%",
                     share < 1)
            per_minute = writes * 60 / self.s.idle
            if api == "v2":
                self.row("etcd writes at rest", n, api, per_minute, None, "per minute",
                         f"{60 / (TTL / 3):g}/min (one per TTL/3 = {TTL / 3:g} s)",
                         None if self.s.idle < TTL / 3
                         else abs(per_minute - 60 / (TTL / 3)) <= 60 / self.s.idle)
            else:
                self.row("etcd writes at rest", n, api, per_minute, None, "per minute",
                         "0/min (a lease keepalive is no write)", per_minute == 0)
            processes[api].stop()
            store.drop(prefixes[api])  # its TTL / lease would end during the next size's measures

    def event_workload(self, watch: Watch, events: DockerEvents) -> dict[str, list[float]]:
        """Starts one by one, a burst, dies one by one, a burst; latencies in ms per phase."""
        def wait_for(action: str, cid: str):
            wait_until(lambda: watch.first(action, cid), 10, f"{action} of {cid[:12]}", interval=0.002)

        def run_one(_=None) -> str:
            return self.engine.out("run", "-d", "-p", "80", BASE_IMAGE)

        singles = []
        for _ in range(self.s.singles):
            singles.append(run_one())
            wait_for("set", singles[-1])
        with ThreadPoolExecutor(10) as pool:
            burst = list(pool.map(run_one, range(self.s.burst)))
        for cid in singles:
            self.engine.docker("kill", cid)
            wait_for("delete", cid)
        self.engine.docker("kill", *burst)
        for cid in burst:
            wait_for("delete", cid)
        time.sleep(0.2)
        self.engine.docker("rm", *singles, *burst)

        def latencies(action: str, event: str, ids: list[str]) -> list[float]:
            found = []
            for cid in ids:
                seen, happened = watch.first(action, cid), events.times[event].get(cid)
                if seen is None or happened is None:
                    raise RuntimeError(f"lost: {event} of {cid[:12]} never reached etcd")
                found.append((seen - happened) / 1e6)
            return found
        return {"start, one by one": latencies("set", "start", singles),
                "start, bursts": latencies("set", "start", burst),
                "die, one by one": latencies("delete", "die", singles),
                "die, bursts": latencies("delete", "die", burst)}

    def event_latency(self) -> None:
        for api, store in self.etcd.items():
            results = {}
            for who in ("register", "floor"):
                prefix = self.fresh_prefix()
                watch = store.watch(prefix)
                events = DockerEvents(self.engine)
                if who == "register":
                    process = self.registrar(api, prefix)
                    process.wait_for_log("full reconcile", timeout=60)
                else:
                    process = self.floor(api, "events", prefix)
                    process.stdout.readline()  # "ready": subscribed
                try:
                    results[who] = self.event_workload(watch, events)
                finally:
                    watch.close()
                    events.close()
                    if who == "register":
                        process.stop()
                    else:
                        end(process, signal.SIGKILL)
                    store.drop(prefix)
            self.raw["latency"][api] = results
            for phase in results["register"]:
                ours, theirs = results["register"][phase], results["floor"][phase]
                n = len(ours)
                for q in (50, 90, 99):
                    target, met = "", None
                    if q == 50 and phase.startswith("start"):
                        target, met = "<= 2x floor p50", percentile(ours, 50) <= 2 * percentile(theirs, 50)
                    if q == 99 and phase == "start, one by one":
                        target, met = "< 100 ms", percentile(ours, 99) < 100
                    self.row(f"latency {phase} p{q}", n, api, percentile(ours, q), percentile(theirs, q),
                             "ms", target, met)
                self.row(f"latency {phase} max", n, api, max(ours), max(theirs), "ms", "no event lost", True)

    def run(self) -> None:
        for n in self.s.sizes:
            self.grow_to(n)
            prefixes = self.cold_sync(n)
            running = self.warm_restart(n, prefixes)
            self.at_rest(n, running, prefixes)
        self.event_latency()
        if len(self.s.sizes) > 1:
            small, large = self.s.sizes[0], self.s.sizes[-1]
            growth = large / small
            for api in self.etcd:
                mine = [r for r in self.rows if r["api"] == api]
                sync = {r["n"]: r["register"] for r in mine if r["measure"] == "cold sync"}
                rss = {r["n"]: r["register"] for r in mine if r["measure"] == "RSS at rest"}
                self.row(f"scaling: cold sync {large} / {small}", "", api, sync[large] / sync[small], None,
                         "x", f"<= {growth:g}x (linear)", sync[large] / sync[small] <= growth)
                self.row(f"scaling: RSS {large} / {small}", "", api, rss[large] / rss[small], None, "x",
                         f"<= {growth:g}x (linear)", rss[large] / rss[small] <= growth)
        self.order_rows()

    def order_rows(self) -> None:
        """Each measure's rows together, by N, each API's row beside the other's."""
        measures = list(dict.fromkeys(r["measure"] for r in self.rows))
        sizes = {n: i for i, n in enumerate(self.s.sizes)}
        self.rows.sort(key=lambda r: (measures.index(r["measure"]), sizes.get(r["n"], -1)))

    # -- output ---------------------------------------------------------------------------------

    def table(self) -> str:
        lines = ["| measure | N | API | register.py | floor | ratio | target | met |",
                 "|---|---:|---|---:|---:|---:|---|---|"]
        for r in self.rows:
            floor = f"{r['floor']:.3g} {r['unit']}".rstrip() if r["floor"] is not None else ""
            ratio = f"{r['register'] / r['floor']:.2f}x" if r["floor"] else ""
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            ours = f"{r['register']:.3g} {r['unit']}".rstrip()
            lines.append(f"| {r['measure']} | {r['n']} | {r['api']} | {ours} | {floor} | {ratio} | "
                         f"{r['target']} | {met} |")
        return "\n".join(lines)

    def requests_note(self) -> str:
        """Which requests each cold sync sent, per API and N (etcd's own counters)."""
        lines = []
        for api, sizes in self.raw["requests"].items():
            for n, whom in sizes.items():
                parts = [f"{who} " + ", ".join(f"{op} {count}" for op, count in counts.items())
                         for who, counts in whom.items()]
                lines.append(f"- {api}, N = {n}: " + "; ".join(parts))
        return "etcd requests of one cold sync (last run; v2: store operations, v3: gRPC calls of the "\
               "gateway):\n" + "\n".join(lines)

    def write(self) -> str:
        out = self.s.out
        out.mkdir(parents=True, exist_ok=True)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        apis = " and ".join(LABELS[api] for api in self.etcd)
        header = (f"docker-etcd-register benchmark, {datetime.date.today().isoformat()}, "
                  f"{os.cpu_count()} cores, {memory:.0f} GiB, medians of {self.s.runs} run(s), "
                  f"Python {sys.version.split()[0]}; APIs: {apis}")
        text = f"{header}\n\n{self.table()}\n\n{self.requests_note()}\n"
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps({"rows": self.rows, "raw": self.raw}, indent=1))
        self.plot(out / "results.png")
        return text

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        apis = list(self.etcd)
        figure, axes = plt.subplots(1, len(apis) + 1, figsize=(6 * (len(apis) + 1), 4.5))
        for api, cdf in zip(apis, axes):
            for who, style in (("register", "-"), ("floor", ":")):
                phases = self.raw["latency"].get(api, {}).get(who, {})
                for number, (phase, values) in enumerate(phases.items()):
                    ordered = sorted(values)  # one colour per phase: solid register.py, dotted floor
                    name = "register.py" if who == "register" else "floor"
                    cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style,
                             color=f"C{number}", label=f"{name}: {phase}")
            cdf.set_xscale("log")
            cdf.set_xlabel("Docker event to etcd watch (ms)")
            cdf.set_ylabel("fraction of events")
            cdf.set_title(f"event latency (CDF), {LABELS[api]}")
            cdf.legend(fontsize=7)
        sync = axes[-1]
        for number, api in enumerate(apis):
            sizes = sorted(self.raw["sync"][api])
            for who, style in (("register", "o-"), ("floor", "s:")):
                sync.plot(sizes, [statistics.median(self.raw["sync"][api][n][who]) for n in sizes], style,
                          color=f"C{number}",
                          label=f"{'register.py' if who == 'register' else 'floor'}, {LABELS[api]}")
        sync.set_xlabel("containers (N)")
        sync.set_ylabel("cold sync, median (s)")
        sync.set_title("cold sync time against N")
        sync.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,500", help="container counts, comma separated")
    parser.add_argument("--runs", type=int, default=5, help="runs per measure (medians are reported)")
    parser.add_argument("--idle", type=float, default=60, help="seconds of the at-rest measure")
    parser.add_argument("--singles", type=int, default=20, help="containers started one by one")
    parser.add_argument("--burst", type=int, default=50, help="containers started in one burst")
    parser.add_argument("--apis", default=",".join(APIS), help="etcd APIs to measure: v2, v3 or v2,v3")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output directory")
    args = parser.parse_args(argv)
    apis = [api for api in APIS if api in args.apis.split(",")]
    if not apis or len(apis) != len(args.apis.split(",")):
        parser.error(f"--apis: a comma-separated choice of {', '.join(APIS)}")
    return Settings([int(n) for n in args.sizes.split(",")], args.runs, args.idle, args.singles, args.burst,
                    args.out, apis)


def start_servers(workdir: Path, apis: list[str]) -> dict[str, EtcdServer]:
    """One etcd per API, as operators run them: 3.4 with --enable-v2 for v2, 3.5.1 with its
    defaults (v3 only) for v3."""
    servers = {}
    for api in apis:
        servers[api] = EtcdServer(workdir, f"bench-{api}", **SERVERS[api])
        servers[api].start()
    return servers


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    workdir = testbed.make_workdir()
    engine, servers = DockerEngine(workdir, "bench"), {}
    try:
        engine.start()
        engine.build_images()
        servers = start_servers(workdir, settings.apis)
        bench = Benchmark(engine, servers, workdir, settings)
        bench.run()
        print(bench.write())
        print(f"written to {settings.out}/results.md, results.png and results.json")
    finally:
        for server in servers.values():
            server.stop()
        engine.stop()
        if not os.environ.get("REGTEST_KEEP"):
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
