"""What a hostile container costs register.py: memory and CPU beside containers with huge records.

    bench/run-hostile [--runs 3] [--window 20] [--before REV]

Starts a dockerd and an etcd of its own (tests/testbed.py) and 20 ordinary containers publishing a
port, then runs register.py in four scenarios, each for `--window` seconds after its first full
reconcile, sampling its RSS every 0.2 s and its CPU time (utime + stime from /proc), and killing
one more container a second into the window (its record must go):

- plain: the 20 ordinary containers only;
- 30,000 ports: plus a host-network container exposing ports 1-30000 (a 5.7 MB record, over the
  default REGISTER_MAX_RECORD_BYTES: not registered);
- 131,070 ports: plus one exposing 1-65535 over tcp and udp instead (a 25 MB record);
- 131,070 ports, limit 64 MiB: the same with the limit raised, so that the record is sent and etcd
  refuses it ("POST too large"): it is retried alone, with its own backoff.

With `--before REV` the same scenarios run side by side with register.py as it was at git revision
REV (default: e57c980, the last one before the record size limit), in the same session. It prints
a markdown table of medians over `--runs` runs: peak RSS, CPU as a share of one core, the ordinary
records in etcd at the end of the window, and in how many runs the killed container's record went.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import testbed  # noqa: E402
from benchmark import cpu_seconds  # noqa: E402
from faults import rss_kib  # noqa: E402
from testbed import BASE_IMAGE, DockerEngine, EtcdServer, Registrar, read_tree, wait_until  # noqa: E402

HOST = "10.77.0.1"
ORDINARY = 20
SCENARIOS = (  # name, --expose arguments of the hostile container, extra settings
    ("plain", (), {}),
    ("30,000 ports", ("--expose", "1-30000"), {}),
    ("131,070 ports", ("--expose", "1-65535", "--expose", "1-65535/udp"), {}),
    ("131,070 ports, limit 64 MiB", ("--expose", "1-65535", "--expose", "1-65535/udp"),
     {"REGISTER_MAX_RECORD_BYTES": str(64 << 20)}),
)


def measure(workdir: Path, engine: DockerEngine, etcd_server: EtcdServer, script: Path, prefix: str,
            settings: dict, window: float) -> tuple[float, float, int, bool]:
    """(peak RSS in MiB, CPU share of one core, ordinary records present, whether the record of a
    container killed a second into the window was removed) over the window."""
    leaving = engine.out("run", "-d", "-p", "80", BASE_IMAGE)
    env = {**engine.env, "ETCD_ENDPOINT": etcd_server.endpoint, "HOST_IP": HOST, "REGISTER_PREFIX": prefix,
           "REGISTER_RESYNC": "5", "LOG_LEVEL": "info", **settings}
    registrar = Registrar(workdir, env, script=script).start()
    try:
        wait_until(lambda: "full reconcile" in registrar.log or "retrying in" in registrar.log, 60,
                   "the first full reconcile")
        pid = registrar.process.pid
        began, cpu, peak, killed = time.monotonic(), cpu_seconds(pid), 0, False
        while time.monotonic() - began < window:
            peak = max(peak, rss_kib(pid))
            if not killed and time.monotonic() - began > 1:
                engine.docker("kill", leaving)
                killed = True
            time.sleep(0.2)
        share = (cpu_seconds(pid) - cpu) / (time.monotonic() - began)
        records = read_tree(etcd_server.client(), f"{prefix}/{HOST}")
        removed = not any(key.endswith(leaving) for key in records)
        ordinary = sum(1 for key, value in records.items()
                       if value.count('"private_port"') == 1 and not key.endswith(leaving))
        return peak / 1024, share, ordinary, removed
    finally:
        registrar.kill()
        engine.docker("rm", "-f", leaving)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (medians are reported)")
    parser.add_argument("--window", type=float, default=20, help="seconds measured per scenario")
    parser.add_argument("--before", default="e57c980", help="git revision to compare with ('' for none)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the test bed on the way out
    workdir = testbed.make_workdir()
    versions = {"register.py": testbed.REGISTER}
    if args.before:
        old = workdir / f"register-{args.before}.py"
        old.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{args.before}:register.py"],
                                       check=True, capture_output=True).stdout)
        versions[f"register.py at {args.before}"] = old
    engine, etcd_server = DockerEngine(workdir, "hostile"), EtcdServer(workdir, "hostile")
    results: dict[tuple[str, str], list[tuple[float, float, int, bool]]] = {}
    try:
        engine.start()
        engine.build_images()
        etcd_server.start()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: engine.out("run", "-d", "-p", "80", BASE_IMAGE), range(ORDINARY)))
        counter = 0
        for _ in range(args.runs):
            for name, expose, settings in SCENARIOS:
                hostile = None
                if expose:
                    hostile = engine.out("run", "-d", "--network", "host", *expose, BASE_IMAGE,
                                         "httpd", "-f", "-p", "127.0.0.1:18097")
                for version, script in versions.items():
                    counter += 1
                    figures = measure(workdir, engine, etcd_server, script, f"/hostile{counter}", settings,
                                      args.window)
                    results.setdefault((name, version), []).append(figures)
                    print(f"{name:32} {version:28} RSS {figures[0]:6.1f} MiB  CPU {figures[1]:6.1%}  "
                          f"ordinary records {figures[2]}/{ORDINARY}  stopped one removed: {figures[3]}",
                          flush=True)
                if hostile:
                    engine.docker("rm", "-f", hostile)
    finally:
        etcd_server.stop()
        engine.stop()
        for mount in [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]:
            if mount.startswith(f"{workdir}/"):  # the engine's netns file may stay mounted
                subprocess.run(["umount", "-l", mount], check=False)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(f"\n| scenario ({ORDINARY} ordinary containers) | version | peak RSS | CPU (one core) | "
          f"ordinary records in etcd | a stopped container's record removed |")
    print("|---|---|---|---|---|---|")
    for (name, version), runs in results.items():
        rss = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        records = min(r[2] for r in runs)
        removed = sum(r[3] for r in runs)
        print(f"| {name} | {version} | {rss:.1f} MiB | {cpu:.1%} | {records}/{ORDINARY} | "
              f"{removed} of {len(runs)} runs |")


if __name__ == "__main__":
    main()
