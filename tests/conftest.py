"""Session fixtures: one real Docker engine, one real etcd and one image registry for the suite."""
from __future__ import annotations

import os
import shutil

import pytest
import testbed


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
