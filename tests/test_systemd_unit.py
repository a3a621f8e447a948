"""register.service, run for real: systemd 252 as PID 1 of a container of the suite's engine starts,
crashes, restarts and stops the unit file of this repository, unchanged (tests/unit_runner.py).

The unit's registrar container runs in the suite's engine with host networking; the machine's
etcd (both flavours: v2 on etcd 3.4, v3 on etcd 3.5) is forwarded to HOST_IP:2379 inside the
engine's namespace, so the unit's own default ETCD_ENDPOINT (http://$HOST_IP:2379, HOST_IP from
COREOS_PRIVATE_IPV4 in /etc/environment) is the one in use.
"""
from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import time

import pytest
import store
import testbed
import unit_runner
from invariant import Invariant, expected_registry
from testbed import BASE_IMAGE, REGISTER, ROOT, SPECIFIC_IPV4, read_tree
from unit_runner import CONTAINER, NetnsForward, SystemdHost, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNIT = ROOT / "register.service"
HOST_IP = SPECIFIC_IPV4  # an address on the engine namespace's loopback, where etcd is forwarded
_hosts = itertools.count(1)


@pytest.fixture(scope="session")
def registrar_tag(registrar_image) -> str:
    return registrar_image


@pytest.fixture(scope="session")
def systemd_image_name(engine) -> str:
    return unit_runner.systemd_image(engine)


@pytest.fixture
def host(docker, systemd_image_name, workdir):
    """A freshly booted systemd machine (no registrar running yet); the engine's containers are
    removed before and after by the `docker` fixture."""
    machine = SystemdHost(docker, systemd_image_name, UNIT, workdir, f"rtb-host{next(_hosts)}-{os.getpid()}")
    try:
        yield machine.start()
    finally:
        machine.stop()


@pytest.fixture
def etcd_at_host_ip(etcd_server, engine):
    """The suite's etcd, reachable from the engine's namespace at http://HOST_IP:2379."""
    forward = NetnsForward(f"/var/run/netns/{engine.netns}", HOST_IP, 2379,
                           ("127.0.0.1", etcd_server.client_port))
    yield etcd_server
    forward.close()


def configure(host: SystemdHost, engine, tag: str, **settings: str) -> None:
    """/etc/environment as CoreOS writes it, and the unit's optional env file with `settings`."""
    host.environment.write_text(f"COREOS_PRIVATE_IPV4={HOST_IP}\nCOREOS_PUBLIC_IPV4=203.0.113.7\n")
    lines = {"REGISTER_IMAGE": tag, "DOCKER_SOCKET": str(engine.socket),
             "REGISTER_CONFIG_DIR": str(host.config_dir), **settings}
    host.env_file.write_text("".join(f"{name}={value}\n" for name, value in lines.items()))


def web(engine, *ports: str) -> str:
    publish = [arg for port in ports for arg in ("-p", port)]
    return engine.out("run", "-d", "--pull=never", *publish, BASE_IMAGE)


def env_of(engine, container: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in engine.inspect(container)["Config"]["Env"])


def test_unit_file_passes_systemd_analyze_verify_on_the_systemd_host(host):
    """`systemd-analyze verify` on the machine that runs it (docker.service: the stand-in): silent,
    exit 0; a broken copy is refused, so the check bites; systemd reads the settings the issue asks."""
    verified = host.exec("systemd-analyze", "verify", unit_runner.UNIT_PATH, check=False)
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")

    broken = UNIT.read_text().replace("RestartSec=5", "RestartSek=5").replace(
        "ExecStop=/usr/bin/docker", "ExecStop=/usr/bin/dockr")
    host.exec("sh", "-c", f"mkdir -p /tmp/broken && cat > /tmp/broken/register.service <<'EOF'\n{broken}EOF")
    refused = host.exec("systemd-analyze", "verify", "/tmp/broken/register.service", check=False)
    assert refused.returncode == 1
    assert "Unknown key 'RestartSek' in section [Service], ignoring." in refused.stderr
    assert "Command /usr/bin/dockr is not executable: No such file or directory" in refused.stderr

    shown = host.show("Restart", "RestartUSec", "RestartPreventExitStatus", "TimeoutStopUSec",
                      "TimeoutStartUSec", "Requires", "After", "EnvironmentFiles", "Environment")
    assert shown["Restart"] == "always"
    assert shown["RestartUSec"] == "5s"
    assert shown["RestartPreventExitStatus"] == "2"
    assert shown["TimeoutStopUSec"] == "20s"
    assert shown["TimeoutStartUSec"] == "infinity"
    assert "docker.service" in shown["Requires"].split()
    assert {"docker.service", "etcd.service", "etcd2.service", "etcd-member.service"} <= set(
        shown["After"].split())
    assert shown["EnvironmentFiles"] == ("/etc/environment (ignore_errors=yes)\n"
                                         "/etc/docker-etcd-register/env (ignore_errors=yes)")
    assert shown["Environment"] == ("REGISTER_IMAGE=docker-etcd-register:latest "
                                    "DOCKER_SOCKET=/var/run/docker.sock "
                                    "REGISTER_CONFIG_DIR=/etc/docker-etcd-register REGISTER_PULL=never")
    # fleet reads [X-Fleet]; systemd ignores X- sections (verify above stayed silent about it)
    assert "\n[X-Fleet]\nGlobal=true\n" in UNIT.read_text()


def test_unit_registers_restarts_after_a_crash_without_stale_records_and_stops(
        host, engine, etcd_at_host_ip, registrar_tag, prefix, api):
    """The unit under systemd: records exact (settings from the env file: API, prefix, TTL), a
    killed container restarted by Restart=always with no stale record, `systemctl stop` within
    TimeoutStopSec leaving the records."""
    client = etcd_at_host_ip.store()
    configure(host, engine, registrar_tag, ETCD_API=str(api), REGISTER_PREFIX=prefix,
              REGISTER_TTL="30", LOG_LEVEL="debug")
    first = web(engine, "80")
    invariant = Invariant(engine, client, prefix, HOST_IP)

    started = time.monotonic()
    host.systemctl("start", "register")
    registered = invariant.wait(60)
    container = host.container_id()
    assert container, host.journal()
    env = env_of(engine, container)
    # HOST_IP from COREOS_PRIVATE_IPV4, ETCD_ENDPOINT from HOST_IP, the rest from the env file
    assert {name: env.get(name) for name in ("HOST_IP", "ETCD_ENDPOINT", "ETCD_API", "REGISTER_PREFIX",
                                             "REGISTER_TTL", "DOCKER_HOST")} == {
        "HOST_IP": HOST_IP, "ETCD_ENDPOINT": f"http://{HOST_IP}:2379", "ETCD_API": str(api),
        "REGISTER_PREFIX": prefix, "REGISTER_TTL": "30", "DOCKER_HOST": "unix:///var/run/docker.sock"}
    mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in engine.inspect(container)["Mounts"]}
    assert mounts == {"/var/run/docker.sock": (str(engine.socket), True),
                      str(host.config_dir): (str(host.config_dir), False)}
    restrictions = engine.inspect(container)["HostConfig"]
    assert (restrictions["ReadonlyRootfs"], restrictions["CapDrop"], restrictions["SecurityOpt"],
            restrictions["NetworkMode"]) == (True, ["ALL"], ["no-new-privileges"], "host")
    records = read_tree(client, f"{prefix}/{HOST_IP}")
    assert list(records) == [f"{prefix}/{HOST_IP}/regtest::busybox:1/{first}"]
    print(f"start to registered: {time.monotonic() - started:.1f} s (invariant {registered:.1f} s)")

    # Crash: the container is killed; while it is down a registered container goes, another comes.
    main_pid = host.show("MainPID")["MainPID"]
    first_key = f"{prefix}/{HOST_IP}/regtest::busybox:1/{first}"
    first_port = engine.inspect(first)["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"]
    engine.docker("kill", CONTAINER)
    killed = time.monotonic()
    engine.docker("rm", "-f", first)
    second = web(engine, "8080:80")
    assert host.show("NRestarts")["NRestarts"] == "0", "restarted before the changes: nothing tested"
    wait_for(lambda: host.show("NRestarts")["NRestarts"] == "1", 30, "systemd to restart the unit")
    restarted = time.monotonic() - killed
    converged = invariant.wait(60, since=killed)
    assert host.show("MainPID")["MainPID"] != main_pid
    assert host.container_id() not in (None, container)
    assert read_tree(client, f"{prefix}/{HOST_IP}") == expected_registry(engine, prefix, HOST_IP)
    assert list(read_tree(client, f"{prefix}/{HOST_IP}")) == [
        f"{prefix}/{HOST_IP}/regtest::busybox:1/{second}"]
    journal = host.journal()
    assert "register.service: Main process exited, code=exited, status=137/n/a" in journal, journal
    assert "register.service: Scheduled restart job, restart counter is at 1." in journal, journal
    # the restarted registrar found the record of the container that went while it was down
    assert any(line.endswith(f" removed stale record of {first[:12]} image regtest::busybox:1 ports "
                             f"80/tcp={HOST_IP}:{first_port} ({first_key}): no such running container")
               for line in journal.splitlines()), journal
    print(f"kill to restart seen: {restarted:.1f} s; kill to converged after the restart: {converged:.1f} s")

    # Stop: within TimeoutStopSec, the records stay (they expire with the TTL unless it comes back).
    before = read_tree(client, f"{prefix}/{HOST_IP}")
    started = time.monotonic()
    host.systemctl("stop", "register")
    stopped = time.monotonic() - started
    assert stopped < 20, stopped
    state = host.show("ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, host.journal()
    assert host.container_id() is None
    assert read_tree(client, f"{prefix}/{HOST_IP}") == before
    journal = host.journal().splitlines()
    # ExecStartPre's failure on a clean host was ignored ("-"), ExecStop's docker stop ran (it
    # prints the name), register.py stopped on its SIGTERM and left the records in place
    assert journal.count("Error: No such container: docker-etcd-register") == 2, journal
    assert journal[-2:] == ["register.service: Deactivated successfully.",
                            "Stopped register.service - docker-etcd-register: this host's containers and "
                            "ports in etcd."], journal
    # docker stop's output and the container's last lines come through two processes: any order
    last = sorted(line.split("    ", 1)[-1] for line in journal[-5:-2])
    assert last == ["docker-etcd-register", "received SIGTERM, stopping",
                    "stopped; 1 record(s) left in place"], journal
    print(f"systemctl stop took {stopped:.1f} s")


def test_a_refused_configuration_is_not_restarted(host, engine, registrar_tag, workdir):
    """A bad setting in the env file: register.py exits 2, systemd does not restart it
    (RestartPreventExitStatus=2), and the journal carries register.py's own message."""
    configure(host, engine, registrar_tag, REGISTER_TTL="soon")
    host.systemctl("start", "register")
    wait_for(lambda: host.show("ActiveState")["ActiveState"] == "failed", 30, "the unit to fail")
    time.sleep(7)  # beyond RestartSec=5: a restart would have come
    state = host.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2",
                     "NRestarts": "0"}, host.journal()
    expected = subprocess.run(
        [sys.executable, str(REGISTER)], capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "HOST_IP": HOST_IP, "ETCD_ENDPOINT": f"http://{HOST_IP}:2379",
             "REGISTER_TTL": "soon"})
    assert expected.returncode == 2
    message = expected.stderr.strip()
    assert message.startswith("register.py: error: REGISTER_TTL"), message
    journal = host.journal()
    assert message in journal.splitlines(), journal
    assert "register.service: Main process exited, code=exited, status=2/INVALIDARGUMENT" in journal
    # systemd's own count of restarts, read again after the journal: still none scheduled or made
    assert host.show("ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}, journal


def test_tls_and_password_files_come_from_the_read_only_configuration_directory(
        host, engine, registrar_tag, prefix, workdir):
    """etcd 3.5 over TLS with client certificates and authentication: the CA, the client
    certificate and key and the password file live in the host's configuration directory, which
    the unit mounts read-only at the same path; the env file names them, and ETCD_ENDPOINT there
    wins over the unit's default. The password shows nowhere in the container's configuration."""
    tls = testbed.make_tls(host.config_dir / "tls")
    server = testbed.EtcdServer(workdir, name=f"rtbtls{os.getpid()}", tls=tls, version="3.5", v2=False,
                                api=3)
    server.start()
    forward = NetnsForward(f"/var/run/netns/{engine.netns}", "127.0.0.1", server.client_port,
                           ("127.0.0.1", server.client_port))
    try:
        root_password, password = f"root-{secrets.token_hex(8)}", f"pw-{secrets.token_hex(8)}"
        server.etcdctl("user", "add", f"root:{root_password}", "--interactive=false")
        server.etcdctl("role", "add", "registrar")
        server.etcdctl("role", "grant-permission", "registrar", "readwrite", f"{prefix}/", "--prefix")
        server.etcdctl("user", "add", f"registrar-user:{password}", "--interactive=false")
        server.etcdctl("user", "grant-role", "registrar-user", "registrar")
        server.etcdctl("auth", "enable")
        password_path = host.config_dir / "password"
        password_path.write_text(password + "\n")
        password_path.chmod(0o600)
        configure(host, engine, registrar_tag, ETCD_ENDPOINT=server.url, ETCD_API="3",
                  REGISTER_PREFIX=prefix, ETCD_CA_FILE=str(tls["ca"]), ETCD_CERT_FILE=str(tls["client"]),
                  ETCD_KEY_FILE=str(tls["client-key"]), ETCD_USERNAME="registrar-user",
                  ETCD_PASSWORD_FILE=str(password_path), LOG_LEVEL="debug")
        first = web(engine, "80")
        token = server.http().post(f"{server.url}/v3/auth/authenticate", timeout=5,
                                   json={"name": "root", "password": root_password}).json()["token"]
        view = store.V3Store(server.url, session=server.http(), token=token)
        host.systemctl("start", "register")
        expected = expected_registry(engine, prefix, HOST_IP)
        assert list(expected) == [f"{prefix}/{HOST_IP}/regtest::busybox:1/{first}"]
        wait_for(lambda: view.records(f"{prefix}/{HOST_IP}") == expected, 60,
                 f"the records over TLS; journal:\n{host.journal()}")
        container = host.container_id()
        inspect = engine.inspect(container)
        env = env_of(engine, container)
        assert env["ETCD_ENDPOINT"] == server.url and env["ETCD_PASSWORD_FILE"] == str(password_path)
        assert "ETCD_PASSWORD" not in env
        assert password not in json.dumps(inspect)
        mounts = {m["Destination"]: (m["Source"], m["RW"]) for m in inspect["Mounts"]}
        assert mounts[str(host.config_dir)] == (str(host.config_dir), False)
        assert f"authenticated to etcd at {server.url} as 'registrar-user'" in host.journal()
        assert password not in host.journal()
        host.systemctl("stop", "register")
    finally:
        forward.close()
        server.stop()


def test_without_the_env_file_etc_environment_and_the_defaults_suffice(host, engine, registrar_tag, workdir):
    """No /etc/docker-etcd-register/env (docker run's --env-file would refuse a missing file): the
    unit's variables come from /etc/environment, register.py's settings are its defaults (v2 API,
    prefix /registered), HOST_IP is COREOS_PRIVATE_IPV4 and ETCD_ENDPOINT http://HOST_IP:2379."""
    server = testbed.EtcdServer(workdir, name=f"rtbdefaults{os.getpid()}", version="3.4", v2=True)
    server.start()
    forward = NetnsForward(f"/var/run/netns/{engine.netns}", HOST_IP, 2379, ("127.0.0.1", server.client_port))
    try:
        host.environment.write_text(
            f"COREOS_PRIVATE_IPV4={HOST_IP}\nREGISTER_IMAGE={registrar_tag}\n"
            f"DOCKER_SOCKET={engine.socket}\nREGISTER_CONFIG_DIR={host.config_dir}\n")
        assert not host.env_file.exists()
        first = web(engine, "80")
        host.systemctl("start", "register")
        client = server.store()
        expected = expected_registry(engine, "/registered", HOST_IP)
        assert list(expected) == [f"/registered/{HOST_IP}/regtest::busybox:1/{first}"]
        wait_for(lambda: read_tree(client, f"/registered/{HOST_IP}") == expected, 60,
                 f"the records with the defaults; journal:\n{host.journal()}")
        env = env_of(engine, host.container_id())
        assert {name: env.get(name) for name in ("HOST_IP", "ETCD_ENDPOINT", "ETCD_API", "REGISTER_PREFIX",
                                                 "REGISTER_IMAGE", "DOCKER_HOST")} == {
            "HOST_IP": HOST_IP, "ETCD_ENDPOINT": f"http://{HOST_IP}:2379", "ETCD_API": None,
            "REGISTER_PREFIX": None, "REGISTER_IMAGE": None, "DOCKER_HOST": "unix:///var/run/docker.sock"}
        assert client.read(f"/registered/{HOST_IP}").ttl is not None  # the default TTL: 60 s
        host.systemctl("stop", "register")
    finally:
        forward.close()
        server.stop()
