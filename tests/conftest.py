"""Session fixtures: one real Docker engine, one real etcd and one image registry for the suite."""
from __future__ import annotations

import itertools
import os
import shutil
import signal

import etcd
import invariant
import pytest
import testbed
from testbed import HOST, Registrar

_prefixes = itertools.count(1)
_servers = itertools.count(1)


@pytest.fixture(scope="session")
def workdir():
    path = testbed.make_workdir()
    yield path
    if not os.environ.get("REGTEST_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_server(workdir):
    server = testbed.EtcdServer(workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine(workdir):
    if os.geteuid() != 0:
        pytest.fail("the integration test bed starts dockerd in a network namespace: run as root")
    docker_engine = testbed.DockerEngine(workdir)
    try:
        docker_engine.start()
        docker_engine.build_images()
        docker_engine.start_registry()
        yield docker_engine
    finally:
        docker_engine.stop()


@pytest.fixture
def own_etcd(workdir):
    """An etcd of the test's own, to kill, pause, wipe or fill with junk."""
    server = testbed.EtcdServer(workdir, name=f"own{next(_servers)}")
    server.start()
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def docker(engine):
    engine.remove_all_containers()
    yield engine
    engine.remove_all_containers()


@pytest.fixture
def client(etcd_server) -> etcd.Client:
    return etcd_server.client()


@pytest.fixture
def prefix() -> str:
    return f"/it{next(_prefixes)}/registered"


@pytest.fixture
def registrar(workdir, etcd_server, engine, prefix):
    """start(**settings) runs register.py with this test's prefix; all are killed at teardown."""
    started: list[Registrar] = []

    def start(host: str = HOST, ttl: int = 60, resync: int = 60, args: tuple = (),
              endpoint: str | None = None, docker_host: str | None = None, env: dict | None = None,
              wrapper: tuple = ()) -> Registrar:
        settings = {**engine.env, "ETCD_ENDPOINT": endpoint or etcd_server.endpoint, "HOST_IP": host,
                    "DOCKER_HOST": docker_host or engine.host,
                    "REGISTER_PREFIX": prefix, "REGISTER_TTL": str(ttl),
                    "REGISTER_RESYNC": str(resync), "LOG_LEVEL": "debug", **(env or {})}
        started.append(Registrar(workdir, settings, list(args), wrapper=list(wrapper)).start())
        return started[-1]

    yield start
    for process in started:
        process.kill()


def pytest_terminal_summary(terminalreporter):
    """The convergence times the fault tests measured, for the closing note and the README."""
    if invariant.MEASURED:
        terminalreporter.section("convergence after each fault (seconds)")
        for fault, seconds in invariant.MEASURED:
            terminalreporter.write_line(f"{seconds:7.2f}  {fault}")
