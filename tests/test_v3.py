"""What only the v3 API has: the API check at start, batched transactions, one request per event.

The rest of v3 runs the whole integration and chaos suites (the v3 flavour of tests/conftest.py)
and the contract suite (test_contract.py); the secured etcd has test_secured.py.
"""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import testbed
from invariant import expected_registry
from testbed import BASE_IMAGE, HOST, wait_until

import register

pytestmark = pytest.mark.integration


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run_to_exit(registrar, **settings) -> testbed.Registrar:
    r = registrar(**settings)
    wait_until(lambda: r.process.poll() is not None, 30, "register.py to exit")
    return r


@pytest.fixture
def server(workdir, request):
    """start(name, version, v2, *flags) -> a running etcd, stopped at teardown."""
    started = []

    def start(name: str, version: str, v2: bool, *flags: str) -> testbed.EtcdServer:
        etcd = testbed.EtcdServer(workdir, name=f"{name}-{len(started)}-{request.node.name[-12:]}",
                                  version=version, v2=v2, flags=flags, api=3)
        etcd.start()
        started.append(etcd)
        return etcd

    yield start
    for etcd in started:
        etcd.stop()


def test_v2_against_an_etcd_without_v2_exits_with_code_2_and_says_what_to_change(
        docker, own_registrar, server):
    etcd = server("nov2", "3.5", False)
    r = run_to_exit(own_registrar, endpoint=etcd.endpoint, env={"ETCD_API": "2", "LOG_FORMAT": "json"})
    assert r.process.returncode == 2
    line = (f"register.py: error: ETCD_API=2 but etcd at {etcd.url} (etcd 3.5.1) does not serve the v2 API "
            "(etcd 3.4 and 3.5 serve it only when started with --enable-v2=true, 3.6 and later not at all); "
            "set ETCD_API=3 (--etcd-api 3) to register with the v3 API, or enable v2 on every member\n")
    assert r.log.endswith(line) and r.log.count("register.py: error:") == 1
    assert "Traceback" not in r.log
    # every line that says "retrying in" (or "reconnecting in") carries retry_in; txn_limit retries
    # in smaller transactions
    retried = [e for e in r.entries() if "retry_in" in e or e.get("event") in ("retry", "txn_limit")]
    assert retried == [], r.log  # it exits, at once


def test_v3_against_an_etcd_whose_gateway_is_off_exits_with_code_2(docker, own_registrar, server):
    etcd = server("nogw", "3.5", False, "--enable-grpc-gateway=false")
    r = run_to_exit(own_registrar, endpoint=etcd.endpoint, env={"ETCD_API": "3"})
    assert r.process.returncode == 2
    assert r.log.endswith(
        f"register.py: error: ETCD_API=3 but etcd at {etcd.url} (etcd 3.5.1) answers 404 under /v3/: its "
        "HTTP gateway, which this registrar speaks v3 through, is turned off (--enable-grpc-gateway=false); "
        "turn it on, or set ETCD_API=2 (--etcd-api 2) if the server serves v2\n")


def test_the_cluster_is_judged_not_one_member(docker, own_registrar, server, prefix):
    """--enable-v2 is set per member: one member that serves v2 is enough; one that is down is
    waited for, unless every member that answers lacks the API."""
    without, with_v2 = server("m1", "3.4", False), server("m2", "3.4", True)
    dead = f"127.0.0.1:{testbed.free_port()}"
    cid = docker.out("run", "-d", "-p", "80", BASE_IMAGE)
    r = own_registrar(endpoint=f"{without.endpoint},{dead},{with_v2.endpoint}",
                      env={"ETCD_API": "2", "LOG_FORMAT": "json"})
    client = with_v2.client()
    expected = expected_registry(docker, prefix, HOST)
    assert list(expected) == [f"{prefix}/{HOST}/regtest::busybox:1/{cid}"]
    wait_until(lambda: testbed.read_tree(client, f"{prefix}/{HOST}") == expected, 30, "the record")
    failed = [e for e in r.entries() if e.get("endpoint") == without.url
              or f"etcd at {without.url} failed" in str(e.get("cause", ""))]
    assert failed == [], failed  # lacking is not failing
    assert r.events("endpoint_down", endpoint=f"http://{dead}")
    assert f"etcd at http://{dead} failed: connection refused; using {with_v2.url}" in r.log
    lacking = run_to_exit(own_registrar, endpoint=f"{dead},{without.endpoint}", env={"ETCD_API": "2"},
                          host="10.99.0.2")
    assert lacking.process.returncode == 2
    assert f"ETCD_API=2 but etcd at {without.url} (etcd 3.4.23) does not serve the v2 API" in lacking.log


def test_a_cold_sync_costs_one_transaction_per_128_records_and_an_event_one_request(server):
    etcd = server("batch", "3.5", False)
    config = register.load_config([], {"ETCD_ENDPOINT": etcd.endpoint, "HOST_IP": HOST, "ETCD_API": "3"})
    registry = register.make_registry(config)
    registry.prepare()
    before = etcd.grpc_calls("Txn")
    puts = [(f"/registered/{HOST}/img:1/{n:064x}", f'"{n}"') for n in range(300)]
    registry.apply([], puts, lambda key, refusal: None)
    assert etcd.grpc_calls("Txn") - before == 3  # 128 + 128 + 44
    assert etcd.store().records(f"/registered/{HOST}") == dict(puts)
    before = etcd.grpc_calls("Txn")
    registry.apply([key for key, _ in puts[:200]], [], lambda key, refusal: None, keep=set())
    assert etcd.grpc_calls("Txn") - before == 2
    before = etcd.grpc_calls("Txn")
    registry.apply([puts[200][0]], [(f"/registered/{HOST}/img:1/{'f' * 64}", "x")], lambda k, r: None)
    assert etcd.grpc_calls("Txn") - before == 2  # the delete, then the put: deletes never wait on a put


def test_one_event_is_one_write_request(docker, own_registrar, server):
    etcd = server("event", "3.5", False)
    r = own_registrar(endpoint=etcd.endpoint, env={"ETCD_API": "3", "LOG_FORMAT": "json"})
    r.wait_for_event("reconciled")
    before = {method: etcd.grpc_calls(method) for method in ("Txn", "Put", "DeleteRange")}
    cid = docker.out("run", "-d", "--name", "one-request", "-p", "80", BASE_IMAGE)
    r.wait_for_event("registered", container="one-request", id=cid[:12])
    docker.docker("rm", "-f", cid)
    r.wait_for_event("removed", container="one-request", id=cid[:12])
    after = {method: etcd.grpc_calls(method) for method in before}
    assert {method: after[method] - before[method] for method in before} == {"Txn": 2, "Put": 0,
                                                                            "DeleteRange": 0}


def test_an_etcd_with_a_lower_max_txn_ops_gets_smaller_transactions(server, caplog):
    etcd = server("ops", "3.5", False, "--max-txn-ops=50")
    config = register.load_config([], {"ETCD_ENDPOINT": etcd.endpoint, "HOST_IP": HOST, "ETCD_API": "3"})
    registry = register.make_registry(config)
    registry.prepare()
    puts = [(f"/registered/{HOST}/img:1/{n:064x}", f'"{n}"') for n in range(150)]
    done = {}
    registry.apply([], puts, lambda key, refusal: done.setdefault(key, refusal))
    assert done == dict.fromkeys(key for key, _ in puts) and registry.max_ops == 32
    registry.apply([key for key, _ in puts[:100]], [], lambda key, refusal: None, keep=set())
    assert etcd.store().records(f"/registered/{HOST}") == dict(puts[100:])
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == [
        "etcd takes fewer than 128 operations per transaction (--max-txn-ops): retrying in transactions "
        "of 64",
        "etcd takes fewer than 64 operations per transaction (--max-txn-ops): retrying in transactions of 32"]


def test_an_http_server_that_is_not_etcd_exits_with_code_2(docker, own_registrar, workdir):
    port = testbed.free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                           cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 10, "the web server")
        r = run_to_exit(own_registrar, endpoint=f"127.0.0.1:{port}", env={"ETCD_API": "3"})
        assert r.process.returncode == 2
        assert r.log.endswith(
            f"register.py: error: ETCD_ENDPOINT: http://127.0.0.1:{port} does not answer like etcd (its "
            "/version names no etcd server); check the host and port of ETCD_ENDPOINT\n")
    finally:
        web.kill()


def test_credentials_for_an_etcd_without_authentication_are_said_unused_once(server, caplog):
    etcd = server("noauth", "3.5", False)
    config = register.load_config([], {"ETCD_ENDPOINT": etcd.endpoint, "HOST_IP": HOST, "ETCD_API": "3",
                                       "ETCD_USERNAME": "registrar", "ETCD_PASSWORD": "s3cret-pw"})
    registry = register.make_registry(config)
    registry.prepare()
    key = f"/registered/{HOST}/img:1/{'a' * 64}"
    registry.apply([], [(key, "[]")], lambda k, refusal: None)
    registry.apply([key], [], lambda k, refusal: None)
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == [
        f"etcd at {etcd.url} has authentication turned off: ETCD_USERNAME='registrar' is not used; "
        "registering without authentication"]
    assert "s3cret" not in caplog.text
    assert etcd.store().get(registry.host_dir) is not None
