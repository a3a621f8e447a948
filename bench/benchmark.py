"""What register.py costs and how it grows, measured side by side with the floor (bench/floor.py).

    bench/run [--sizes 100,500] [--runs 5] [--idle 60] [--singles 20] [--burst 50] [--out DIR]

Starts a dockerd and an etcd of its own (tests/testbed.py), creates N containers publishing a
port, and prints a markdown table of medians (also written to DIR/results.md, with DIR/results.png
and the raw figures in DIR/results.json):

- cold sync: from spawning the process to the N-th record seen through an etcd watch, for
  register.py on an empty prefix and for the floor (one list call, N sequential puts);
- warm restart: register.py restarted with every record right: time to its "full reconcile" log
  line, and the etcd writes it made (etcd's index before and after);
- event latency: from Docker's event (`timeNano`) to the key's change arriving through an etcd
  watch, for starts one by one and in bursts, then for dies, against the floor's script;
- cost at rest: RSS, CPU seconds over the idle period, etcd writes per minute (etcd's index).

Timings on a shared 2-core machine are noisy: they are medians of runs made in the same session,
and ratios to a floor measured alongside. None of this is a pass/fail test; a smoke run with
N = 10 is (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
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
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import testbed  # noqa: E402
from faults import rss_kib  # noqa: E402
from testbed import BASE_IMAGE, DockerEngine, EtcdServer, Registrar, end, wait_until  # noqa: E402

FLOOR = Path(__file__).resolve().parent / "floor.py"
HOST = "10.88.0.1"
TTL = 60


class Watch:
    """An etcd v2 stream watch on a prefix; records (arrival ns, action, key) for each change."""

    def __init__(self, etcd_url: str, prefix: str):
        self.changes: list[tuple[int, str, str]] = []
        self._response = requests.get(f"{etcd_url}/v2/keys{prefix}",
                                      params={"wait": "true", "recursive": "true", "stream": "true"},
                                      stream=True, timeout=(5, None))
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
                    change = json.loads(line)
                    self.changes.append((arrived, change["action"], change["node"]["key"]))
        except Exception:
            return  # closed

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


class Benchmark:
    def __init__(self, engine: DockerEngine, etcd_server: EtcdServer, workdir: Path, settings: Settings):
        self.engine = engine
        self.etcd = etcd_server
        self.workdir = workdir
        self.s = settings
        self.client = etcd_server.client()
        self.runs = 0
        self.rows: list[dict] = []
        self.raw: dict = {"sync": {}, "latency": {}}

    # -- helpers --------------------------------------------------------------------------------

    def fresh_prefix(self) -> str:
        self.runs += 1
        return f"/bench-{os.getpid()}-{self.runs}"

    def env(self, prefix: str) -> dict:
        return {**self.engine.env, "ETCD_ENDPOINT": self.etcd.endpoint, "HOST_IP": HOST,
                "REGISTER_PREFIX": prefix, "REGISTER_TTL": str(TTL), "REGISTER_RESYNC": "300"}

    def registrar(self, prefix: str) -> Registrar:
        return Registrar(self.workdir, self.env(prefix), name="bench-register").start()

    def floor(self, mode: str, prefix: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(FLOOR), mode, self.etcd.url, prefix, HOST],
                                env=self.env(prefix), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def etcd_index(self) -> int:
        return self.client.read("/").etcd_index

    def grow_to(self, n: int) -> None:
        missing = n - len(self.engine.out("ps", "-q").split())
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: self.engine.out("run", "-d", "-p", "80", BASE_IMAGE), range(missing)))

    def row(self, measure: str, n: int | str, register: float, floor: float | None, unit: str,
            target: str, met: bool | None) -> None:
        self.rows.append({"measure": measure, "n": n, "register": register, "floor": floor, "unit": unit,
                          "target": target, "met": met})

    # -- measures -------------------------------------------------------------------------------

    def synced(self, watch: Watch, n: int, process, timeout: float = 120) -> None:
        def done():
            if process.poll() not in (None, 0):
                raise RuntimeError(f"a process under test exited with {process.poll()}")
            return watch.distinct_sets() >= n
        wait_until(done, timeout, f"{n} records", interval=0.005)

    def cold_sync(self, n: int) -> str:
        """Medians of cold syncs (register.py, floor); returns the last prefix register.py filled."""
        times = {"register": [], "floor": []}
        used = []
        for _ in range(self.s.runs):
            for who in ("register", "floor"):
                prefix = self.fresh_prefix()
                used.append(prefix)
                watch = Watch(self.etcd.url, prefix)
                started = time.time_ns()
                if who == "register":
                    process = self.registrar(prefix)
                    self.synced(watch, n, process.process)
                else:
                    process = self.floor("cold", prefix)
                    self.synced(watch, n, process)
                last_set = max(t for t, action, _ in watch.changes if action == "set")
                times[who].append((last_set - started) / 1e9)
                watch.close()
                if who == "register":
                    process.stop()
                    filled = prefix
                else:
                    process.wait(30)
                    floor_prefix = prefix
        ours = testbed.read_tree(self.client, f"{filled}/{HOST}")
        theirs = testbed.read_tree(self.client, f"{floor_prefix}/{HOST}")
        if {k.replace(filled, floor_prefix, 1): v for k, v in ours.items()} != theirs or len(ours) != n:
            raise RuntimeError("register.py and the floor did not write the same records")
        for prefix in used:  # their host directories would expire later and count as writes at rest
            if prefix != filled:
                self.client.delete(prefix, recursive=True, dir=True)
        register, floor = statistics.median(times["register"]), statistics.median(times["floor"])
        self.raw["sync"][n] = times
        ratio = register / floor
        self.row("cold sync", n, register, floor, "s", "<= 1.3x floor", ratio <= 1.3)
        return filled

    def warm_restart(self, n: int, prefix: str) -> Registrar:
        """Restarts on a right tree; returns the last registrar, left running for the rest measures."""
        times, writes = [], []
        process = None
        for run in range(self.s.runs):
            before = self.etcd_index()
            started = time.time()
            process = self.registrar(prefix)
            process.wait_for_log("full reconcile", timeout=60)
            times.append(log_time(process.log, "full reconcile") - started)
            if "0 written, 0 removed" not in process.log:
                raise RuntimeError(f"warm restart wrote records:\n{process.log}")
            writes.append(self.etcd_index() - before)
            if run < self.s.runs - 1:
                process.stop()
        self.row("warm restart: time to in sync", n, statistics.median(times), None, "s", "< 1 s",
                 statistics.median(times) < 1)
        self.row("warm restart: etcd writes", n, max(writes), None, "writes", "0", max(writes) == 0)
        return process

    def at_rest(self, n: int, process: Registrar) -> None:
        pid = process.process.pid
        time.sleep(1)
        cpu, index = cpu_seconds(pid), self.etcd_index()
        time.sleep(self.s.idle)
        cpu = cpu_seconds(pid) - cpu
        writes = self.etcd_index() - index
        rss = rss_kib(pid) / 1024
        self.row("RSS at rest", n, rss, None, "MiB", "< 60 MiB", rss < 60)
        self.row(f"CPU over {self.s.idle:g} s idle", n, 100 * cpu / self.s.idle, None, "% of a core", "< 1%",
                 100 * cpu / self.s.idle < 1)
        per_minute = writes * 60 / self.s.idle
        self.row("etcd writes at rest", n, per_minute, None, "per minute",
                 f"{60 / (TTL / 3):g}/min (one per TTL/3 = {TTL / 3:g} s)", None if self.s.idle < TTL / 3
                 else abs(per_minute - 60 / (TTL / 3)) <= 60 / self.s.idle)
        process.stop()

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
        results = {}
        for who in ("register", "floor"):
            prefix = self.fresh_prefix()
            watch = Watch(self.etcd.url, prefix)
            events = DockerEvents(self.engine)
            if who == "register":
                process = self.registrar(prefix)
                process.wait_for_log("full reconcile", timeout=60)
            else:
                process = self.floor("events", prefix)
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
        self.raw["latency"] = results
        for phase in results["register"]:
            ours, theirs = results["register"][phase], results["floor"][phase]
            n = len(ours)
            for q in (50, 90, 99):
                target, met = "", None
                if q == 50 and phase.startswith("start"):
                    target, met = "<= 2x floor p50", percentile(ours, 50) <= 2 * percentile(theirs, 50)
                if q == 99 and phase == "start, one by one":
                    target, met = "< 100 ms", percentile(ours, 99) < 100
                self.row(f"latency {phase} p{q}", n, percentile(ours, q), percentile(theirs, q), "ms",
                         target, met)
            self.row(f"latency {phase} max", n, max(ours), max(theirs), "ms", "no event lost", True)

    def run(self) -> None:
        for n in self.s.sizes:
            self.grow_to(n)
            prefix = self.cold_sync(n)
            running = self.warm_restart(n, prefix)
            self.at_rest(n, running)
        self.event_latency()
        if len(self.s.sizes) > 1:
            small, large = self.s.sizes[0], self.s.sizes[-1]
            sync = {r["n"]: r["register"] for r in self.rows if r["measure"] == "cold sync"}
            rss = {r["n"]: r["register"] for r in self.rows if r["measure"] == "RSS at rest"}
            growth = large / small
            self.row(f"scaling: cold sync {large} / {small}", "", sync[large] / sync[small], None, "x",
                     f"<= {growth:g}x (linear)", sync[large] / sync[small] <= growth)
            self.row(f"scaling: RSS {large} / {small}", "", rss[large] / rss[small], None, "x",
                     f"<= {growth:g}x (linear)", rss[large] / rss[small] <= growth)

    # -- output ---------------------------------------------------------------------------------

    def table(self) -> str:
        lines = ["| measure | N | register.py | floor | ratio | target | met |",
                 "|---|---:|---:|---:|---:|---|---|"]
        for r in self.rows:
            floor = f"{r['floor']:.3g} {r['unit']}" if r["floor"] is not None else ""
            ratio = f"{r['register'] / r['floor']:.2f}x" if r["floor"] else ""
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            lines.append(f"| {r['measure']} | {r['n']} | {r['register']:.3g} {r['unit']} | {floor} | "
                         f"{ratio} | {r['target']} | {met} |")
        return "\n".join(lines)

    def write(self) -> str:
        out = self.s.out
        out.mkdir(parents=True, exist_ok=True)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        header = (f"docker-etcd-register benchmark, {datetime.date.today().isoformat()}, "
                  f"{os.cpu_count()} cores, {memory:.0f} GiB, medians of {self.s.runs} run(s), "
                  f"Python {sys.version.split()[0]}")
        text = f"{header}\n\n{self.table()}\n"
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(json.dumps({"rows": self.rows, "raw": self.raw}, indent=1))
        self.plot(out / "results.png")
        return text

    def plot(self, path: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, (cdf, sync) = plt.subplots(1, 2, figsize=(12, 4.5))
        for who, style in (("register", "-"), ("floor", ":")):
            for number, (phase, values) in enumerate(self.raw["latency"].get(who, {}).items()):
                ordered = sorted(values)  # one colour per phase: solid register.py, dotted floor
                name = "register.py" if who == "register" else "floor"
                cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], style,
                         color=f"C{number}", label=f"{name}: {phase}")
        cdf.set_xscale("log")
        cdf.set_xlabel("Docker event to etcd watch (ms)")
        cdf.set_ylabel("fraction of events")
        cdf.set_title("event latency (CDF)")
        cdf.legend(fontsize=7)
        sizes = sorted(self.raw["sync"])
        for who, style in (("register", "o-"), ("floor", "s:")):
            sync.plot(sizes, [statistics.median(self.raw["sync"][n][who]) for n in sizes], style,
                      label="register.py" if who == "register" else "floor")
        sync.set_xlabel("containers (N)")
        sync.set_ylabel("cold sync, median (s)")
        sync.set_title("cold sync time against N")
        sync.legend()
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
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="output directory")
    args = parser.parse_args(argv)
    return Settings([int(n) for n in args.sizes.split(",")], args.runs, args.idle, args.singles, args.burst,
                    args.out)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    workdir = testbed.make_workdir()
    engine, etcd_server = DockerEngine(workdir, "bench"), EtcdServer(workdir, "bench")
    try:
        engine.start()
        engine.build_images()
        etcd_server.start()
        bench = Benchmark(engine, etcd_server, workdir, settings)
        bench.run()
        print(bench.write())
        print(f"written to {settings.out}/results.md, results.png and results.json")
    finally:
        etcd_server.stop()
        engine.stop()
        if not os.environ.get("REGTEST_KEEP"):
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
