"""Three Docker hosts on one machine: the real equivalent of vagrant/Vagrantfile's cluster.

Each host is a network namespace of its own holding what a machine of that cluster holds: a
dockerd (tests/testbed.py's DockerEngine: own data root, exec root, socket, containerd
namespace), one member of a three-member etcd cluster, and the registrar, started as
register.service starts it. The hosts are wired to a switch, a fourth namespace with a bridge,
each by a veth pair whose host end is the host's eth0 (10.97.0.11-13/24, its HOST_IP). One more
veth pair links the switch to the test process's namespace (10.97.0.1), so the test reads the etcd
members at 10.97.0.1N:2379 directly; the bridge lives in the switch namespace so that the
machine's own netfilter (bridge-nf-call-iptables) never sees the hosts' traffic.

Faults, as on real machines:
- `Host.cut()` / `Host.reconnect()`: the switch port of the host goes down / up (a pulled cable);
- `Host.power_off()` / `Host.power_on()`: every process of the host is killed -9 (dockerd,
  containerd, the containers, the etcd member, the registrar), then the host boots again: dockerd,
  its etcd member with the data it had, and the registrar as the unit starts it after a boot.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import etcd
import requests
import store as store_module
import testbed
from testbed import BASE_IMAGE, DockerEngine, end, run, spawn, wait_until

SUBNET = "10.97.0"
GATEWAY = f"{SUBNET}.1"  # the test process's end of the network
TAG = f"rtC{os.getpid() % 100000}"  # interface names: at most 15 bytes
CONTAINER = "docker-etcd-register"  # register.service's container name
UNIT_CONFIG_DIR = "/etc/docker-etcd-register"  # register.service's REGISTER_CONFIG_DIR


def in_netns(netns: str, *args: str) -> list[str]:
    # nsenter, not `ip netns exec`: that one remounts /sys and hides the cgroups from dockerd
    return ["nsenter", f"--net=/var/run/netns/{netns}", *args]


class Member:
    """This host's etcd member: it listens on the host's address (peers and clients) and on the
    host's loopback (clients), with a data directory that outlives a power-off."""

    def __init__(self, host: Host, version: str, v2: bool, api: int, initial_cluster: str, token: str):
        self.host = host
        self.version = version
        self.v2 = v2
        self.api = api
        self.initial_cluster = initial_cluster
        self.token = token
        self.name = host.name
        self.url = f"http://{host.address}:2379"
        self.data_dir = host.dir / f"etcd-{token}"
        self.log_path = host.dir / f"etcd-{token}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        peer = f"http://{self.host.address}:2380"
        self.process = spawn(in_netns(
            self.host.netns, testbed.etcd_binary(self.version), "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", f"{self.url},http://127.0.0.1:2379", "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token, f"--enable-v2={str(self.v2).lower()}",
            "--log-level", "warn"), self.log_path, start_new_session=True)

    def healthy(self) -> bool:
        return testbed.etcd_healthy(self.process, self.url, self.http(), self.log_path)

    def http(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        return session

    def status(self) -> dict:
        return self.http().post(f"{self.url}/v3/maintenance/status", json={}, timeout=3).json()

    def store(self) -> store_module.Store:
        """What this member holds, through the API the registrars speak (tests/store.py)."""
        if self.api == 2:
            return store_module.V2Store(etcd.Client(host=self.host.address, port=2379, read_timeout=5))
        return store_module.V3Store(self.url, session=self.http())

    def kill(self) -> None:
        end(self.process, signal.SIGKILL)


class Host:
    """One machine of the cluster: a network namespace with its dockerd, etcd member and registrar."""

    def __init__(self, workdir: Path, number: int):
        self.number = number
        self.name = f"host{number}"
        self.address = f"{SUBNET}.{10 + number}"
        self.engine = DockerEngine(workdir, name=f"rtC-h{number}")
        self.netns = self.engine.netns
        self.dir = self.engine.dir
        self.port = f"{TAG}p{number}"  # the switch's port for this host
        self.member: Member | None = None
        self.registrar_image: str | None = None
        self.registrar_settings: dict[str, str] = {}
        self.switch: str | None = None
        self.connected = True
        self.powered = True

    # -- the machine ---------------------------------------------------------------------------

    def create(self, switch: str, bridge: str) -> None:
        """The namespace, its eth0 plugged into the switch, and dockerd."""
        self.engine.start()  # makes the namespace (loopback up) and starts dockerd in it
        inside = f"{TAG}e{self.number}"
        run("ip", "link", "add", inside, "type", "veth", "peer", "name", self.port)
        run("ip", "link", "set", self.port, "netns", switch)
        run("ip", "link", "set", inside, "netns", self.netns)
        run(*in_netns(self.netns, "ip", "link", "set", inside, "name", "eth0"))
        run(*in_netns(self.netns, "ip", "addr", "add", f"{self.address}/24", "dev", "eth0"))
        run(*in_netns(self.netns, "ip", "link", "set", "eth0", "up"))
        run(*in_netns(switch, "ip", "link", "set", self.port, "master", bridge, "up"))
        self.switch = switch

    def cut(self) -> None:
        """The host's cable out of the switch: it can reach no one, no one reaches it."""
        run(*in_netns(self.switch, "ip", "link", "set", self.port, "down"))
        self.connected = False

    def reconnect(self) -> None:
        run(*in_netns(self.switch, "ip", "link", "set", self.port, "up"))
        self.connected = True

    def power_off(self) -> None:
        """Every process of the host killed -9 at once, as when the power goes: the containers
        (in their own namespaces, found by their cgroups), then everything in the host's
        namespace (dockerd, containerd and its shims, the etcd member, a registrar process)."""
        self.powered = False
        container_ids = self.engine.out("ps", "-q", "--no-trunc").split()
        for _ in range(3):  # a process may fork while its siblings die
            victims = [pid for pid in _pids() if _cgroup_mentions(pid, container_ids)]
            victims += [int(p) for p in run("ip", "netns", "pids", self.netns, check=False).stdout.split()]
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for process in (self.engine.process, self.member and self.member.process):
            if process is not None:
                process.wait(10)
        # the next dockerd must not wait for the dead containerd's socket (DockerEngine.stop_daemon)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "exec" / "containerd" / "containerd.pid").unlink()

    def power_on(self) -> None:
        """The host boots: dockerd (it restarts the containers whose policy says so), the etcd
        member with its data, then the registrar as register.service starts it."""
        self.engine.start_daemon()
        self.member.start()
        self.powered = True
        if self.registrar_image is not None:
            self.start_registrar()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_registrar()
        if self.member is not None:
            self.member.kill()
        self.engine.stop()  # removes the containers, stops dockerd, kills leftovers, deletes the netns

    # -- the registrar -------------------------------------------------------------------------

    def start_registrar(self, image: str | None = None, settings: dict[str, str] | None = None) -> None:
        """What register.service's ExecStartPre and ExecStart do on this host: the old container
        removed, a new one run (detached here: systemd would hold it in the foreground) with host
        networking, the host's Docker socket, the settings from the unit's env file (this host's
        /etc/docker-etcd-register/env, mounted read-only at that path as REGISTER_CONFIG_DIR),
        HOST_IP and ETCD_ENDPOINT as the unit works them out (http://$HOST_IP:2379: this host's
        own etcd member), and never a pull."""
        if image is not None:
            self.registrar_image = image
        if settings is not None:
            self.registrar_settings = settings
        self.remove_registrar()
        config_dir = self.dir / "etc-docker-etcd-register"
        config_dir.mkdir(exist_ok=True)
        env_file = config_dir / "env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in self.registrar_settings.items()))
        self.engine.docker(
            "run", "-d", "--rm", "--name", CONTAINER, "--net", "host", "--pull", "never",
            "--env-file", str(env_file), "-v", f"{self.engine.socket}:/var/run/docker.sock",
            "-v", f"{config_dir}:{UNIT_CONFIG_DIR}:ro", "-e", "DOCKER_HOST=unix:///var/run/docker.sock",
            "-e", f"HOST_IP={self.address}", "-e", f"ETCD_ENDPOINT=http://{self.address}:2379",
            self.registrar_image)

    def registrar_id(self) -> str:
        return self.engine.out("inspect", "--format", "{{.Id}}", CONTAINER)

    def registrar_running(self) -> bool:
        """Running, never restarted (the unit's container runs with --rm: a new one has a new id)."""
        state = self.engine.docker("inspect", "--format", "{{.State.Running}} {{.RestartCount}}",
                                   CONTAINER, check=False)
        return state.stdout.decode().strip() == "true 0"

    def registrar_log(self) -> str:
        result = self.engine.docker("logs", CONTAINER, check=False, timeout=20)
        return (result.stdout + result.stderr).decode(errors="replace")

    def stop_registrar(self) -> None:
        """ExecStop: docker stop, then forget it (a power-on no longer starts it)."""
        self.engine.docker("stop", "-t", "10", CONTAINER, check=False, timeout=60)
        self.remove_registrar()
        self.registrar_image = None

    def remove_registrar(self) -> None:
        """`docker rm -f`, and wait until the name is free: a --rm container that just stopped
        is still being removed by dockerd, and a `docker run` with its name would then fail."""
        def gone() -> bool:
            self.engine.docker("rm", "-f", CONTAINER, check=False)
            return self.engine.docker("inspect", CONTAINER, check=False).returncode != 0
        wait_until(gone, 30, f"{CONTAINER} removed on {self.name}", interval=0.2)

    # -- its workload --------------------------------------------------------------------------

    def run_container(self, *args: str) -> str:
        """A busybox httpd with the given docker run options; never pulls."""
        return self.engine.out("run", "-d", "--pull=never", *args, BASE_IMAGE)

    def remove_workload(self) -> None:
        """Every container but the registrar."""
        ids = [line.split()[0] for line in self.engine.out("ps", "-a", "--format", "{{.ID}} {{.Names}}")
               .splitlines() if line.split()[1] != CONTAINER]
        if ids:
            self.engine.docker("rm", "-f", *ids, timeout=300)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cgroup_mentions(pid: int, container_ids: list[str]) -> bool:
    if not container_ids:
        return False
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return any(cid in text for cid in container_ids)


class Cluster:
    """The switch, the three hosts and their dockerds; the etcd cluster comes and goes per flavour."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.switch = f"rtC-sw-{os.getpid()}"
        self.bridge = "br0"
        self.uplink = f"{TAG}up"  # the test process's end
        self.hosts = [Host(workdir, n) for n in (1, 2, 3)]
        self.token = ""
        self.image: str | None = None  # the registrar's image, in every host's engine

    def create(self) -> None:
        taken = run("ip", "route", "show", f"{SUBNET}.0/24").stdout.decode().strip()
        if taken:
            raise RuntimeError(f"{SUBNET}.0/24 is routed already ({taken}): another cluster test bed "
                               "runs on this machine, or a dead one left its interface behind")
        run("ip", "netns", "add", self.switch)
        run(*in_netns(self.switch, "ip", "link", "set", "lo", "up"))
        run(*in_netns(self.switch, "ip", "link", "add", self.bridge, "type", "bridge"))
        run(*in_netns(self.switch, "ip", "link", "set", self.bridge, "up"))
        switch_side = f"{TAG}us"
        run("ip", "link", "add", self.uplink, "type", "veth", "peer", "name", switch_side)
        run("ip", "link", "set", switch_side, "netns", self.switch)
        run(*in_netns(self.switch, "ip", "link", "set", switch_side, "master", self.bridge, "up"))
        run("ip", "addr", "add", f"{GATEWAY}/24", "dev", self.uplink)
        run("ip", "link", "set", self.uplink, "up")
        for host in self.hosts:
            host.create(self.switch, self.bridge)
            host.engine.build_images()

    def start_etcd(self, version: str, v2: bool, api: int, token: str) -> None:
        """A new three-member etcd cluster, one member per host, on the hosts' links."""
        self.token = token
        initial = ",".join(f"{h.name}=http://{h.address}:2380" for h in self.hosts)
        for host in self.hosts:
            host.member = Member(host, version, v2, api, initial, token)
            host.member.start()
        for host in self.hosts:
            wait_until(host.member.healthy, 60, f"etcd member of {host.name}", interval=0.2)

    def stop_etcd(self) -> None:
        for host in self.hosts:
            if host.member is not None:
                host.member.kill()

    def each(self, action: Callable[[Host], object]) -> list:
        """`action(host)` on the three hosts at once (their engines are independent)."""
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            return list(pool.map(action, self.hosts))

    def restore(self) -> None:
        """Every host powered and connected, every member healthy, every registrar running: after
        a test, even a failed one."""
        for host in self.hosts:
            if not host.powered:
                host.power_on()
            if not host.connected:
                host.reconnect()
        for host in self.hosts:
            wait_until(host.member.healthy, 60, f"etcd member of {host.name}", interval=0.2)
            if host.registrar_image is not None and not host.registrar_running():
                host.start_registrar()

    def leader(self) -> Host:
        """The host whose member leads now, as the reachable members see it."""
        by_id = {}
        leader_ids = set()
        for host in self.hosts:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                status = host.member.status()
                by_id[status["header"]["member_id"]] = host
                leader_ids.add(status["leader"])
        leaders = [by_id[i] for i in leader_ids if i in by_id]
        if len(leader_ids) != 1 or not leaders:
            raise RuntimeError(f"the members do not agree on one leader: {leader_ids}")
        return leaders[0]

    def destroy(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.destroy()
            run("ip", "netns", "delete", host.netns, check=False)
        for leftover in (self.uplink, *(f"{TAG}e{h.number}" for h in self.hosts),
                         *(h.port for h in self.hosts)):  # in the machine's namespace if a move failed
            run("ip", "link", "delete", leftover, check=False)
        run("ip", "netns", "delete", self.switch, check=False)


# -- what the registry must hold ---------------------------------------------------------------

def registry_problems(store: store_module.Store, prefix: str, live: list[Host]) -> str:
    """'' when `prefix` holds exactly the records of the `live` hosts' running containers (keys
    and bytes, as tests/invariant.py computes them from `docker inspect`), each host's liveness
    (v2: a directory with a TTL; v3: the host key on a live lease that carries all its records),
    and nothing of any other host; otherwise what differs."""
    import invariant

    expected: dict[str, str] = {}
    for host in live:
        expected.update(invariant.expected_registry(host.engine, prefix, host.address))
    actual = store.records(prefix)
    host_keys = {key for key in actual if key.count("/") == prefix.count("/") + 1}  # v3's host keys
    records = {key: value for key, value in actual.items() if key not in host_keys}
    problems = [invariant.diff(expected, records)] if expected != records else []
    unexpected_hosts = sorted(host_keys - {f"{prefix}/{host.address}" for host in live})
    problems += [f"  unexpected host key: {key}" for key in unexpected_hosts]
    live_addresses = {host.address for host in live}
    if store.api == 2:  # a v2 host directory of a dead host, even empty, must be gone too
        with contextlib.suppress(etcd.EtcdKeyNotFound):
            problems += [f"  unexpected host directory: {node.key}"
                         for node in store.client.read(prefix).leaves  # the host directories
                         if node.key != prefix and node.key.rsplit("/", 1)[1] not in live_addresses]
    for host in live:
        host_dir = f"{prefix}/{host.address}"
        liveness = store.liveness(host_dir)
        if liveness is None:
            problems.append(f"  {host_dir} is missing")
        elif liveness <= 0:
            problems.append(f"  {host_dir} has no TTL (v2) or no live lease (v3)")
        elif store.api == 3:
            lease = store.lease_of(host_dir)
            problems += [f"  {key} is not on {host.name}'s lease {lease:x}" for key in records
                         if key.startswith(host_dir + "/") and store.lease_of(key) != lease]
    return "\n".join(problems)


def wait_for_registry(store: store_module.Store, prefix: str, live: list[Host], timeout: float,
                      cluster: Cluster, since: float | None = None) -> float:
    """Poll until registry_problems() is ''; return the seconds since `since` (default: now).
    On timeout, fail with the difference and the end of each registrar's log."""
    start = time.monotonic() if since is None else since
    deadline = time.monotonic() + timeout
    problems = "(never read)"
    while time.monotonic() < deadline:
        try:
            problems = registry_problems(store, prefix, live)
        except (requests.RequestException, etcd.EtcdException) as error:
            problems = f"  the member does not answer: {error}"
        if not problems:
            return time.monotonic() - start
        time.sleep(0.2)
    logs = "\n".join(f"--- {host.name}'s registrar:\n{host.registrar_log()[-3000:]}"
                     for host in cluster.hosts)
    raise AssertionError(f"the registry did not converge in {timeout} s:\n{problems}\n{logs}")
