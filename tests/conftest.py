"""Session fixtures: one real Docker engine, one real etcd and one image registry for the suite."""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import time

import invariant
import pytest
import store
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


# Which etcd the integration and chaos suites run against: each test that uses etcd runs on both.
# v3 on etcd 3.5.1 started with its defaults (no v2); v2 on Debian's etcd 3.4 with --enable-v2.
# The other two combinations run the shared contract suite (test_contract.py).
FLAVOURS = {"v2": {"api": 2, "version": "3.4", "v2": True},
            "v3": {"api": 3, "version": "3.5", "v2": False}}


@pytest.fixture(scope="session", params=list(FLAVOURS))
def flavour(request) -> dict:
    return {"name": request.param, **FLAVOURS[request.param]}


# The fast tier (scripts/test --fast, pytest -m fast) is every test that needs neither root, nor
# Debian's tools, nor a daemon, nor the network: one that carries none of these markers (a module
# that needs more declares `pytestmark = pytest.mark.integration`) and whose fixture closure holds
# no fixture of the test bed. Every fixture that starts a part of it (dockerd, etcd, the image
# registry, register.py) depends on workdir, so workdir stands for all of them.
NOT_FAST_MARKERS = ("integration", "chaos", "slow")
TESTBED_FIXTURE = "workdir"


def is_fast(item: pytest.Item) -> bool:
    return (TESTBED_FIXTURE not in getattr(item, "fixturenames", ())
            and not any(item.get_closest_marker(name) for name in NOT_FAST_MARKERS))


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the `fast` marker
def pytest_collection_modifyitems(config, items):
    """Tests of v2 mechanics (directories, python-etcd) run on the v2 flavour only; the tests of
    the fast tier are marked `fast` (marking deselects nothing)."""
    kept = [item for item in items if not (item.get_closest_marker("v2_only") and getattr(
        item, "callspec", None) and item.callspec.params.get("flavour") == "v3")]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    for item in items:
        if is_fast(item):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def new_etcd(workdir, flavour):
    """new_etcd(name, **settings): an etcd server of this run's flavour, not started."""
    def make(name: str, **settings) -> testbed.EtcdServer:
        return testbed.EtcdServer(workdir, name=f"{name}-{flavour['name']}", version=flavour["version"],
                                  v2=flavour["v2"], api=flavour["api"], **settings)
    return make


@pytest.fixture(scope="session")
def etcd_server(new_etcd):
    server = new_etcd("regtest")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(flavour) -> int:
    return flavour["api"]


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


@pytest.fixture(scope="session")
def registrar_image(engine) -> str:
    """The registrar's image, built once per session in the suite's engine from the Debian base
    (tests/image.py); the cluster's engines load it from there."""
    import image
    started = time.monotonic()
    tag = image.registrar_image(engine)
    image.TIMINGS.append(("registrar image in the suite's engine, all steps", time.monotonic() - started))
    return tag


@pytest.fixture
def own_etcd(new_etcd):
    """An etcd of the test's own, to kill, pause, wipe or fill with junk."""
    server = new_etcd(f"own{next(_servers)}")
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
def client(etcd_server) -> store.Store:
    """The suite's etcd, through the API of this run's flavour (tests/store.py)."""
    return etcd_server.store()


@pytest.fixture
def prefix() -> str:
    return f"/it{next(_prefixes)}/registered"


def _registrars(workdir, engine, prefix: str, endpoint: str | None, api: int, request):
    """start(**settings) runs register.py with this test's prefix; all are killed at teardown. In a
    test marked `json_log` it logs in the JSON format unless `env` says otherwise: what the test
    waits for, or checks did not happen, is an event of the log with its fields
    (testbed.Registrar.events), not a wording."""
    json_log = {"LOG_FORMAT": "json"} if request.node.get_closest_marker("json_log") else {}
    started: list[Registrar] = []

    def start(host: str = HOST, ttl: int = 60, resync: int = 60, args: tuple = (),
              endpoint: str | None = endpoint, docker_host: str | None = None, env: dict | None = None,
              wrapper: tuple = ()) -> Registrar:
        if endpoint is None:
            raise ValueError("own_registrar needs the test's etcd endpoint")
        settings = {**engine.env, "ETCD_ENDPOINT": endpoint, "HOST_IP": host,
                    "DOCKER_HOST": docker_host or engine.host,
                    "REGISTER_PREFIX": prefix, "REGISTER_TTL": str(ttl),
                    "REGISTER_RESYNC": str(resync), "LOG_LEVEL": "debug",
                    "ETCD_API": str(api), **json_log, **(env or {})}
        started.append(Registrar(workdir, settings, list(args), wrapper=list(wrapper)).start())
        return started[-1]

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def registrar(workdir, etcd_server, engine, prefix, request):
    """register.py against the suite's etcd, through this run's flavour's API."""
    yield from _registrars(workdir, engine, prefix, etcd_server.endpoint, etcd_server.api, request)


@pytest.fixture
def own_registrar(workdir, engine, prefix, request):
    """register.py against an etcd of the test's own (`endpoint=` is required; the API is 2 unless
    `env` sets ETCD_API): not parametrized by the flavour, so such a test runs once."""
    yield from _registrars(workdir, engine, prefix, None, 2, request)


def pytest_terminal_summary(terminalreporter):
    """The convergence times the fault tests measured, for the closing note and the README."""
    if invariant.MEASURED:
        terminalreporter.section("convergence after each fault (seconds)")
        for fault, seconds in invariant.MEASURED:
            terminalreporter.write_line(f"{seconds:7.2f}  {fault}")
