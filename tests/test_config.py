"""Configuration: every bad value is one line on stderr naming it, exit code 2, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import testbed
from testbed import REGISTER

import register
from register import Endpoint, load_config

HIDDEN = " (values hidden); see register.py --help for the flags"  # what argparse did not take
GOOD = {"ETCD_ENDPOINT": "127.0.0.1:2379", "HOST_IP": "10.0.0.1"}
ENDPOINT_EXPECTED = ("expected host:port, http://host:port or https://host:port, "
                     "or a comma-separated list of them")
TTL_EXPECTED = "expected 0 (no TTL) or a whole number of seconds from 3 to 86400 (one day)"
RESYNC_EXPECTED = "expected a whole number of seconds from 1 to 86400 (one day)"
PREFIX_EXPECTED = ("expected an absolute etcd path below the root, of letters, digits and . _ : @ - between "
                   "slashes, e.g. REGISTER_PREFIX=/registered")
DOCKER_EXPECTED = ("expected unix:///path/to/docker.sock, tcp://host:port, or ssh://user@host with paramiko "
                   "installed, e.g. DOCKER_HOST=unix:///var/run/docker.sock")
HOST_IP_EXPECTED = "expected this host's IPv4 or IPv6 address, e.g. HOST_IP=10.0.0.1"
CREDENTIALS = "carries credentials, which do not belong in an address (they would show in logs)"


def run_register(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REGISTER), *args], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=timeout)


def refused_at_start(env: dict, *args: str, timeout: float = 10) -> str:
    """register.py run with settings it must refuse before doing anything: exit code 2, nothing on
    stdout, exactly one stderr line "register.py: error: ..." and no traceback. Returns the
    message after "register.py: error: ". A process that takes the settings and runs is killed
    after `timeout` seconds, and the test fails saying so."""
    try:
        result = run_register(env, *args, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        result = None
    if result is None:
        pytest.fail(f"register.py took these settings and was still running after {timeout} s; it said:\n"
                    f"{said[-1000:]}")
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("register.py: error: "), lines[0]
    return lines[0].removeprefix("register.py: error: ")


@pytest.mark.parametrize(("env", "args", "line"), [
    ({"HOST_IP": "10.0.0.1"}, [],
     f"ETCD_ENDPOINT is not set (nor --etcd-endpoint); {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({"ETCD_ENDPOINT": "127.0.0.1:2379"}, [],
     "HOST_IP is not set (nor --host-ip); expected this host's IPv4 or IPv6 address, e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "HOST_IP": " "}, [],
     "HOST_IP is empty; expected this host's IPv4 or IPv6 address, e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "ETCD_ENDPOINT": ""}, [],
     f"ETCD_ENDPOINT is empty; {ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "127.0.0.1:70000"}, [],
     f"ETCD_ENDPOINT='127.0.0.1:70000' has a port out of range 1-65535; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "etcd:0"}, [],
     f"ETCD_ENDPOINT='etcd:0' has a port out of range 1-65535; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://a:2379,b:port"}, [],
     f"ETCD_ENDPOINT='http://a:2379,b:port' has a port that is not a number (in entry 'b:port'); "
     f"{ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "ftp://etcd:2379"}, [],
     f"ETCD_ENDPOINT='ftp://etcd:2379' has scheme 'ftp', not http or https; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "fd00::1:2379"}, [],
     f"ETCD_ENDPOINT='fd00::1:2379' has an IPv6 address without brackets, as in [fd00::1]:2379; "
     f"{ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://[fd00::1"}, [],
     f"ETCD_ENDPOINT='http://[fd00::1' has a broken [IPv6] address; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://etcd:2379/v2/keys"}, [],
     f"ETCD_ENDPOINT='http://etcd:2379/v2/keys' has more than a scheme, a host and a port; "
     f"{ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://a:2379,https://b:2379"}, [],
     f"ETCD_ENDPOINT='http://a:2379,https://b:2379' mixes http and https; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "a:2379,"}, [],
     f"ETCD_ENDPOINT='a:2379,' has an empty entry in its list; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "my etcd"}, [],
     f"ETCD_ENDPOINT='my etcd' has a host, 'my etcd', that is neither an IP address nor a host name; "
     f"{ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "HOST_IP": "10.0.0.300"}, [],
     "HOST_IP='10.0.0.300' is not an IPv4 or IPv6 address; expected this host's IPv4 or IPv6 address, "
     "e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "HOST_IP": "0.0.0.0"}, [],
     "HOST_IP='0.0.0.0' is the unspecified address, which names no host; expected this host's IPv4 or "
     "IPv6 address, e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "HOST_IP": "::"}, [],
     "HOST_IP='::' is the unspecified address, which names no host; expected this host's IPv4 or "
     "IPv6 address, e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "HOST_IP": "fe80::1%eth0"}, [],
     "HOST_IP='fe80::1%eth0' is an address with a zone, which other hosts cannot use; expected this "
     "host's IPv4 or IPv6 address, e.g. HOST_IP=10.0.0.1"),
    ({**GOOD, "REGISTER_TTL": "-5"}, [],
     f"REGISTER_TTL='-5' is negative; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_TTL": "1m"}, [],
     f"REGISTER_TTL='1m' is not a whole number of seconds; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_TTL": "2"}, [], f"REGISTER_TTL='2' is below 3; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_RESYNC": "0"}, [],
     f"REGISTER_RESYNC='0' is below 1; {RESYNC_EXPECTED}, e.g. REGISTER_RESYNC=60"),
    # a day at most: a TTL or a resync of years is a typo
    ({**GOOD, "REGISTER_TTL": "86401"}, [],
     f"REGISTER_TTL='86401' is above 86400; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_TTL": "9000000001"}, [],
     f"REGISTER_TTL='9000000001' is above 86400; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_TTL": "99999999999999999999999"}, [],
     f"REGISTER_TTL='99999999999999999999999' is above 86400; {TTL_EXPECTED}, e.g. REGISTER_TTL=60"),
    ({**GOOD, "REGISTER_RESYNC": "99999999999"}, [],
     f"REGISTER_RESYNC='99999999999' is above 86400; {RESYNC_EXPECTED}, e.g. REGISTER_RESYNC=60"),
    ({**GOOD, "REGISTER_PREFIX": "registered"}, [],
     f"REGISTER_PREFIX='registered' does not start with /; {PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/"}, [],
     "REGISTER_PREFIX='/' is the root, which would mix the registry with everything else; "
     f"{PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/a//b"}, [],
     f"REGISTER_PREFIX='/a//b' has an empty path segment; {PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/registered/../elsewhere"}, [],
     f"REGISTER_PREFIX='/registered/../elsewhere' has a '..' segment, which etcd would resolve to another "
     f"path; {PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/."}, [],
     f"REGISTER_PREFIX='/.' has a '.' segment, which etcd would resolve to another path; {PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/registered/./x"}, [],
     f"REGISTER_PREFIX='/registered/./x' has a '.' segment, which etcd would resolve to another path; "
     f"{PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/registered?wait=true"}, [],
     f"REGISTER_PREFIX='/registered?wait=true' has a character, '?', that does not belong in an etcd key "
     f"path; {PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/reg istered"}, [],
     f"REGISTER_PREFIX='/reg istered' has a character, ' ', that does not belong in an etcd key path; "
     f"{PREFIX_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/registered/_hidden"}, [],
     "REGISTER_PREFIX='/registered/_hidden' has a segment, '_hidden', that starts with _, which etcd v2 "
     f"hides from listings; {PREFIX_EXPECTED}"),
    ({**GOOD, "HOST_IP": "0.1.2.3"}, [],
     "HOST_IP='0.1.2.3' is in 0.0.0.0/8, which means this network, not a host others can reach; "
     f"{HOST_IP_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "tcp://docker host:2375"}, [],
     "DOCKER_HOST='tcp://docker host:2375' has a host, 'docker host', that is neither an IP address nor a "
     f"host name; {DOCKER_EXPECTED}"),
    ({**GOOD, "REGISTER_PREFIX": "/a%2F.."}, [],
     f"REGISTER_PREFIX='/a%2F..' has a character, '%', that does not belong in an etcd key path; "
     f"{PREFIX_EXPECTED}"),
    # HOST_IP that no other host can reach
    ({**GOOD, "HOST_IP": "::ffff:0.0.0.0"}, [],
     f"HOST_IP='::ffff:0.0.0.0' is the unspecified address, which names no host; {HOST_IP_EXPECTED}"),
    ({**GOOD, "HOST_IP": "0:0::0"}, [],
     f"HOST_IP='0:0::0' is the unspecified address, which names no host; {HOST_IP_EXPECTED}"),
    ({**GOOD, "HOST_IP": "224.0.0.1"}, [],
     f"HOST_IP='224.0.0.1' is a multicast address, which names no single host; {HOST_IP_EXPECTED}"),
    ({**GOOD, "HOST_IP": "ff02::1"}, [],
     f"HOST_IP='ff02::1' is a multicast address, which names no single host; {HOST_IP_EXPECTED}"),
    ({**GOOD, "HOST_IP": "255.255.255.255"}, [],
     f"HOST_IP='255.255.255.255' is the broadcast address, which names no single host; {HOST_IP_EXPECTED}"),
    # DOCKER_HOST that can never work (an engine that is down is waited for instead)
    ({**GOOD, "DOCKER_HOST": "ssh://deploy@docker.example.org"}, [],
     "DOCKER_HOST='ssh://***@docker.example.org' needs the Docker SDK's ssh support (pip install "
     f"paramiko), which is not installed; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "npipe:////./pipe/docker_engine"}, [],
     "DOCKER_HOST='npipe:////./pipe/docker_engine' is a Windows named pipe, which this host cannot open; "
     f"{DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "fd://"}, [],
     "DOCKER_HOST='fd://' is systemd's socket activation address, which only dockerd itself can use; "
     f"{DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "tcp://docker:notaport"}, [],
     f"DOCKER_HOST='tcp://docker:notaport' has a port that is not a number; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "tcp://docker:99999"}, [],
     f"DOCKER_HOST='tcp://docker:99999' has a port out of range 1-65535; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "tcp://docker"}, [],
     f"DOCKER_HOST='tcp://docker' has no port (Docker listens on 2375, or 2376 with TLS); {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "tcp://"}, [],
     f"DOCKER_HOST='tcp://' is not an address the Docker SDK can use; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "docker:2375"}, [],
     f"DOCKER_HOST='docker:2375' has no scheme; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "ftp://docker:2375"}, [],
     f"DOCKER_HOST='ftp://docker:2375' has scheme 'ftp', not unix, tcp or ssh; {DOCKER_EXPECTED}"),
    (GOOD, ["--docker-host", "fd://"],
     "--docker-host='fd://' is systemd's socket activation address, which only dockerd itself can use; "
     + DOCKER_EXPECTED.replace("DOCKER_HOST=", "--docker-host=")),
    ({**GOOD, "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/nonexistent/tls"}, [],
     "DOCKER_CERT_PATH='/nonexistent/tls' lacks a readable ca.pem, cert.pem, key.pem, which "
     "DOCKER_TLS_VERIFY or DOCKER_CERT_PATH asks for; expected the Docker CLI's TLS files there, "
     "e.g. DOCKER_CERT_PATH=/etc/docker/tls"),
    ({**GOOD, "REGISTER_MAX_RECORD_BYTES": "100"}, [],
     "REGISTER_MAX_RECORD_BYTES='100' is below 1024; expected a whole number of bytes from 1024 up, "
     "e.g. REGISTER_MAX_RECORD_BYTES=524288"),
    ({**GOOD, "REGISTER_MAX_RECORD_BYTES": "1M"}, [],
     "REGISTER_MAX_RECORD_BYTES='1M' is not a whole number of bytes; expected a whole number of bytes from "
     "1024 up, e.g. REGISTER_MAX_RECORD_BYTES=524288"),
    ({**GOOD, "LOG_LEVEL": "verbose"}, [],
     "LOG_LEVEL='verbose' is not one of the choices; expected debug, info, warning or error, "
     "e.g. LOG_LEVEL=info"),
    ({**GOOD, "LOG_FORMAT": "xml"}, [],
     "LOG_FORMAT='xml' is not one of the choices; expected text or json, e.g. LOG_FORMAT=json"),
    ({**GOOD, "ETCD_ENDPOINT": "https://etcd:2379", "ETCD_CA_FILE": "/nonexistent/ca.pem"}, [],
     "ETCD_CA_FILE='/nonexistent/ca.pem' is not a readable file; expected a readable PEM file, "
     "e.g. ETCD_CA_FILE=/etc/ssl/etcd/ca.pem"),
    # a flag is named as a flag
    (GOOD, ["--ttl=-1"], f"--ttl='-1' is negative; {TTL_EXPECTED}, e.g. --ttl=60"),
    (GOOD, ["--ttl=86401"], f"--ttl='86401' is above 86400; {TTL_EXPECTED}, e.g. --ttl=60"),
    (GOOD, ["--resync", "100000"], f"--resync='100000' is above 86400; {RESYNC_EXPECTED}, e.g. --resync=60"),
    (GOOD, ["--host-ip", "example.org"],
     "--host-ip='example.org' is not an IPv4 or IPv6 address; expected this host's IPv4 or IPv6 "
     "address, e.g. --host-ip=10.0.0.1"),
    (GOOD, ["--bogus"], f"unrecognized arguments: --bogus{HIDDEN}"),
    (GOOD, ["--resync"], "argument --resync: expected one argument"),
])
def test_bad_configuration_is_one_line_and_exit_code_2(env, args, line):
    assert refused_at_start(env, *args) == line  # exit code 2, this one stderr line, nothing on stdout


@pytest.mark.parametrize(("env", "args", "line"), [
    ({**GOOD, "ETCD_ENDPOINT": "http://admin:s3cret-pw@etcd:2379"}, [],
     f"ETCD_ENDPOINT='http://***@etcd:2379' {CREDENTIALS}; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "admin:s3cret-pw@etcd"}, [],
     f"ETCD_ENDPOINT='***@etcd' {CREDENTIALS}; {ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://a:2379,https://admin:s3cret-pw@b:notaport", "LOG_FORMAT": "json"}, [],
     f"ETCD_ENDPOINT='http://***@b:notaport' {CREDENTIALS}; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    (GOOD, ["--etcd-endpoint", "https://admin:s3cret-pw@[fd00::1"],
     f"--etcd-endpoint='https://***@[fd00::1' {CREDENTIALS}; {ENDPOINT_EXPECTED}, "
     "e.g. --etcd-endpoint=http://127.0.0.1:2379"),
    ({**GOOD, "DOCKER_HOST": "tcp://admin:s3cret-pw@docker:2376"}, [],
     f"DOCKER_HOST='tcp://***@docker:2376' {CREDENTIALS}; {DOCKER_EXPECTED}"),
    ({**GOOD, "DOCKER_HOST": "ssh://admin:s3cret-pw@docker"}, [],
     f"DOCKER_HOST='ssh://***@docker' {CREDENTIALS}; {DOCKER_EXPECTED}"),
    # a password may hold any character: everything up to the last @ goes
    ({**GOOD, "ETCD_ENDPOINT": "http://admin:pa/s3cret#x?y@etcd:2379"}, [],
     f"ETCD_ENDPOINT='http://***@etcd:2379' {CREDENTIALS}; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "http://admin:s3cret,pw @@etcd:2379"}, [],
     f"ETCD_ENDPOINT='http://***@etcd:2379' {CREDENTIALS}; {ENDPOINT_EXPECTED}, "
     "e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "ETCD_ENDPOINT": "//admin:s3cret@etcd"}, [],
     f"ETCD_ENDPOINT='***@etcd' {CREDENTIALS}; {ENDPOINT_EXPECTED}, e.g. ETCD_ENDPOINT=http://127.0.0.1:2379"),
    ({**GOOD, "DOCKER_HOST": "tcp://admin:pa#s3cret@docker:2375"}, [],
     f"DOCKER_HOST='tcp://***@docker:2375' {CREDENTIALS}; {DOCKER_EXPECTED}"),
    # argparse repeats what it did not understand: masked too (and no abbreviated flags)
    (GOOD, ["--etcd-endpont=http://admin:s3cret@etcd:2379"],
     f"unrecognized arguments: --etcd-endpont=***{HIDDEN}"),
    (GOOD, ["--etcd=http://admin:s3cret@etcd:2379"], f"unrecognized arguments: --etcd=***{HIDDEN}"),
])
def test_credentials_in_an_address_are_refused_and_never_printed(env, args, line):
    result = run_register(env, *args)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"register.py: error: {line}\n", "")
    assert "s3cret" not in result.stderr and "admin" not in result.stderr


AUTH_EXAMPLE = "e.g. ETCD_PASSWORD_FILE=/run/secrets/etcd-password"


@pytest.mark.parametrize(("env", "args", "line"), [
    ({**GOOD, "ETCD_API": "4"}, [],
     "ETCD_API='4' is not one of the choices; expected 2 or 3, e.g. ETCD_API=3"),
    (GOOD, ["--etcd-api", "v3"],
     "--etcd-api='v3' is not one of the choices; expected 2 or 3, e.g. --etcd-api=3"),
    ({**GOOD, "ETCD_PASSWORD": "s3cret-pw"}, [],
     "ETCD_PASSWORD is set but ETCD_USERNAME is not; expected both, e.g. ETCD_USERNAME=registrar"),
    ({**GOOD, "ETCD_USERNAME": "registrar"}, [],
     f"ETCD_USERNAME is set but neither ETCD_PASSWORD nor ETCD_PASSWORD_FILE is; expected one of them, "
     f"{AUTH_EXAMPLE}"),
    ({**GOOD, "ETCD_USERNAME": "registrar", "ETCD_PASSWORD": "s3cret-pw",
      "ETCD_PASSWORD_FILE": "/etc/hostname"}, [],
     f"ETCD_PASSWORD and ETCD_PASSWORD_FILE are both set; expected one of them, {AUTH_EXAMPLE}"),
    ({**GOOD, "ETCD_USERNAME": "reg istrar", "ETCD_PASSWORD": "s3cret-pw"}, [],
     "ETCD_USERNAME='reg istrar' holds a space, a colon or a control character; expected an etcd user "
     "name, without spaces, colons or control characters, e.g. ETCD_USERNAME=registrar"),
    ({**GOOD, "ETCD_USERNAME": "registrar"}, ["--etcd-password-file", "/nonexistent/pw"],
     "--etcd-password-file='/nonexistent/pw' is not a readable file; expected a readable file holding the "
     "password (a trailing newline is ignored), e.g. --etcd-password-file=/run/secrets/etcd-password"),
    ({**GOOD, "ETCD_USERNAME": "registrar"}, ["--etcd-password", "s3cret-pw"],
     "there is no --etcd-password flag (a password on the command line shows in ps); expected "
     "ETCD_PASSWORD in the environment or --etcd-password-file"),
    ({**GOOD, "ETCD_USERNAME": "registrar"}, ["--etcd-password=s3cret-pw"],
     "there is no --etcd-password flag (a password on the command line shows in ps); expected "
     "ETCD_PASSWORD in the environment or --etcd-password-file"),
])
def test_bad_authentication_settings_are_one_line_and_never_print_the_password(env, args, line):
    result = run_register(env, *args)
    assert (result.returncode, result.stderr, result.stdout) == (2, f"register.py: error: {line}\n", "")
    assert "s3cret" not in result.stderr


def test_the_password_file_loses_its_trailing_newline_only_and_an_empty_one_is_refused(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text(" s3cret pw \n")
    config = load_config(["--etcd-password-file", str(secret)], {**GOOD, "ETCD_USERNAME": "registrar"})
    assert register.read_password_file(config.etcd_password_file) == " s3cret pw "
    assert "s3cret" not in repr(config)
    config = load_config([], {**GOOD, "ETCD_USERNAME": "registrar", "ETCD_PASSWORD": "s3cret"})
    assert (config.etcd_password, "s3cret" in repr(config)) == ("s3cret", False)
    secret.write_text("\n")
    result = run_register({**GOOD, "ETCD_USERNAME": "registrar", "ETCD_PASSWORD_FILE": str(secret)})
    assert result.returncode == 2
    assert result.stderr == (
        f"register.py: error: ETCD_PASSWORD_FILE={str(secret)!r} is empty; expected a readable file holding "
        "the password (a trailing newline is ignored), e.g. ETCD_PASSWORD_FILE=/run/secrets/etcd-password\n")


def test_help_documents_every_setting_with_its_default():
    result = run_register({}, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for env, flag, default in [
        ("ETCD_ENDPOINT", "--etcd-endpoint", None), ("HOST_IP", "--host-ip", None),
        ("REGISTER_PREFIX", "--prefix", "/registered"), ("REGISTER_TTL", "--ttl", "60"),
        ("REGISTER_RESYNC", "--resync", "60"), ("LOG_LEVEL", "--log-level", "info"),
        ("ETCD_CA_FILE", "--etcd-ca-file", None), ("ETCD_CERT_FILE", "--etcd-cert-file", None),
        ("ETCD_KEY_FILE", "--etcd-key-file", None),
        ("LOG_FORMAT", "--log-format", "text"), ("DOCKER_HOST", "--docker-host", None),
        ("REGISTER_MAX_RECORD_BYTES", "--max-record-bytes", "524288"),
        ("ETCD_API", "--etcd-api", "2"), ("ETCD_USERNAME", "--etcd-username", None),
        ("ETCD_PASSWORD_FILE", "--etcd-password-file", None),
        ("REGISTER_HEALTH_ADDR", "--health-addr", None),
    ]:
        assert f"{flag} {env}" in text
        assert f"[env {env}]" in text
        if default is not None:
            assert f"[env {env}] (default: {default})" in text
    assert "--deregister-on-exit" in text
    assert "DOCKER_HOST" in text
    assert "`register.py healthcheck` asks a running service's health server (--health-addr)" in text


HEALTH_EXPECTED = "expected an IP address (IPv6 in brackets) or localhost, a colon and a port"


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:9109", ("127.0.0.1", 9109)), ("[::1]:9109", ("::1", 9109)),
    ("localhost:1", ("localhost", 1)), (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)), ("", None)])
def test_the_health_address(text, address):
    assert load_config([], {**GOOD, "REGISTER_HEALTH_ADDR": text}).health_addr == address
    assert load_config(["--health-addr", text], GOOD).health_addr == address


@pytest.mark.parametrize(("text", "problem"), [
    ("9109", "is not host:port"),
    (":9109", "is not host:port"),
    ("::1:9109", "is not host:port (an IPv6 address goes in brackets)"),
    ("[127.0.0.1]:9109", "is not host:port (only an IPv6 address goes in brackets)"),
    ("health.example:9109", "has host 'health.example', which is neither an IP address nor localhost"),
    ("127.0.0.1:http", "has a port that is not a number"),
    ("127.0.0.1:0", "has a port out of range 1-65535"),
    ("127.0.0.1:65536", "has a port out of range 1-65535"),
])
def test_a_bad_health_address_is_refused(text, problem):
    result = run_register({**GOOD, "REGISTER_HEALTH_ADDR": text})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"register.py: error: REGISTER_HEALTH_ADDR={text!r} {problem}; "
                             f"{HEALTH_EXPECTED}, e.g. REGISTER_HEALTH_ADDR=127.0.0.1:9109\n")
    checked = run_register({}, "healthcheck", "--health-addr", text)
    assert (checked.returncode, checked.stdout) == (2, "")
    assert checked.stderr == (f"register.py healthcheck: error: --health-addr={text!r} {problem}; "
                              f"{HEALTH_EXPECTED}, e.g. --health-addr=127.0.0.1:9109\n")


def test_healthcheck_without_an_address():
    result = run_register({}, "healthcheck")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "register.py healthcheck: error: REGISTER_HEALTH_ADDR is not set (nor --health-addr); expected the "
        "address the service's health server listens on, e.g. REGISTER_HEALTH_ADDR=127.0.0.1:9109\n")


def test_a_health_port_in_use_is_refused_at_start():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_register({**GOOD, "REGISTER_HEALTH_ADDR": f"127.0.0.1:{port}"})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"register.py: error: the health address 127.0.0.1:{port} (REGISTER_HEALTH_ADDR, --health-addr) "
        "cannot be listened on (address already in use); expected a free port on an address of this host")
    assert "Traceback" not in result.stderr


def test_defaults():
    config = load_config([], GOOD)
    assert config == register.Config(
        etcd_endpoints=(Endpoint("http", "127.0.0.1", 2379),), host_ip="10.0.0.1", prefix="/registered",
        ttl=60, resync=60, log_level="info", log_format="text", deregister_on_exit=False)
    assert config.host_dir == "/registered/10.0.0.1"


def test_tls_files_and_empty_optional_settings(tls):
    config = load_config(["--etcd-ca-file", tls["ca"]],
                         {"ETCD_ENDPOINT": "https://etcd:2379", "HOST_IP": "10.0.0.1",
                          "ETCD_CERT_FILE": tls["client"], "ETCD_KEY_FILE": tls["client-key"]})
    assert (config.etcd_ca_file, config.etcd_cert_file, config.etcd_key_file) == (
        tls["ca"], tls["client"], tls["client-key"])
    empty = load_config([], {**GOOD, "ETCD_CA_FILE": "", "ETCD_CERT_FILE": " ", "ETCD_KEY_FILE": ""})
    assert (empty.etcd_ca_file, empty.etcd_cert_file, empty.etcd_key_file) == (None, None, None)


def test_a_flag_wins_over_the_environment():
    config = load_config(["--host-ip", "10.0.0.2", "--ttl", "0", "--prefix", "/services/",
                          "--deregister-on-exit"], {**GOOD, "HOST_IP": "not an address", "REGISTER_TTL": "x"})
    assert (config.host_ip, config.ttl, config.prefix, config.deregister_on_exit) == \
        ("10.0.0.2", 0, "/services", True)


@pytest.mark.parametrize(("text", "canonical"), [
    ("FD00:0::1", "fd00::1"), ("fd00:0000:0000:0000:0000:0000:0000:0001", "fd00::1"),
    ("10.0.0.1", "10.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::ffff:10.0.0.1", "10.0.0.1"),
    ("::FFFF:a00:1", "10.0.0.1"), ("169.254.0.5", "169.254.0.5"), ("240.0.0.1", "240.0.0.1"),
])
def test_host_ip_is_canonical(text, canonical):
    assert load_config([], {**GOOD, "HOST_IP": text}).host_ip == canonical


@pytest.mark.parametrize(("text", "endpoints"), [
    ("etcd", (Endpoint("http", "etcd", 2379),)),
    ("etcd:4001", (Endpoint("http", "etcd", 4001),)),
    ("https://etcd.example.org", (Endpoint("https", "etcd.example.org", 2379),)),
    ("http://[FD00::1]:2379/", (Endpoint("http", "[fd00::1]", 2379),)),
    ("[::1]", (Endpoint("http", "[::1]", 2379),)),
    ("etcd_1", (Endpoint("http", "etcd_1", 2379),)),
    ("http://project_etcd_1:2379", (Endpoint("http", "project_etcd_1", 2379),)),
    ("10.0.0.1:2379, 10.0.0.2:2379,10.0.0.3",
     (Endpoint("http", "10.0.0.1", 2379), Endpoint("http", "10.0.0.2", 2379),
      Endpoint("http", "10.0.0.3", 2379))),
])
def test_endpoints(text, endpoints):
    assert register.parse_endpoints(text) == endpoints


@pytest.mark.parametrize(("host_ip", "warnings"), [
    ("10.0.0.1", []), ("fd00::1", []),
    ("127.0.0.1", ["HOST_IP 127.0.0.1 is a loopback address: no other host can reach the ports registered "
                   "under it (fine for a single-host demo)"]),
    ("::1", ["HOST_IP ::1 is a loopback address: no other host can reach the ports registered under it "
             "(fine for a single-host demo)"]),
    ("169.254.0.5", ["HOST_IP 169.254.0.5 is a link-local address: only hosts on the same link can reach the "
                     "ports registered under it"]),
    ("fe80::1", ["HOST_IP fe80::1 is a link-local address: only hosts on the same link can reach the ports "
                 "registered under it"]),
])
def test_host_ip_warnings(host_ip, warnings):
    assert register.host_ip_warnings(host_ip) == warnings


def test_docker_host_default_and_flag():
    assert load_config([], GOOD).docker_host == "unix:///var/run/docker.sock"
    assert load_config([], {**GOOD, "DOCKER_HOST": ""}).docker_host == "unix:///var/run/docker.sock"
    flag = load_config(["--docker-host", "tcp://[::1]:2375"], {**GOOD, "DOCKER_HOST": "fd://"})
    assert flag.docker_host == "tcp://[::1]:2375"


def test_endpoint_url():
    assert Endpoint("https", "[fd00::1]", 2379).url == "https://[fd00::1]:2379"


# -- bounds: a day at most ---------------------------------------------------------------------

def test_a_day_is_the_longest_ttl_and_resync():
    config = load_config([], {**GOOD, "REGISTER_TTL": "86400", "REGISTER_RESYNC": "86400"})
    assert (config.ttl, config.resync) == (86400, 86400)
    assert load_config(["--ttl", "86400", "--resync", "86400"], GOOD).ttl == 86400
    for name, expected in (("REGISTER_TTL", TTL_EXPECTED), ("REGISTER_RESYNC", RESYNC_EXPECTED)):
        with pytest.raises(register.ConfigError) as refused:
            load_config([], {**GOOD, name: "86401"})
        assert str(refused.value) == f"{name}='86401' is above 86400; {expected}, e.g. {name}=60"


# -- TLS files: read at start, with real PEM material made by openssl ---------------------------

@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, str]:
    """testbed.make_tls's CA, server and client files, plus an empty file and one of junk text."""
    directory = tmp_path_factory.mktemp("tls")
    files = {name: str(path) for name, path in testbed.make_tls(directory).items()}
    (directory / "empty.pem").write_text("")
    (directory / "junk.pem").write_text("this is not PEM, just text someone pasted\n")
    return {**files, "empty": str(directory / "empty.pem"), "junk": str(directory / "junk.pem")}


HTTPS = {**GOOD, "ETCD_ENDPOINT": "https://127.0.0.1:2379"}
NO_CERTIFICATE = "holds no PEM certificate (it is empty, or holds something else, such as a key)"
CA_EXPECTED = "expected a readable PEM file, e.g. ETCD_CA_FILE=/etc/ssl/etcd/ca.pem"


# (settings naming files of the `tls` fixture, what the line says: "=" the whole line, "^" its start)
@pytest.mark.parametrize(("files", "how", "line"), [
    ({"ETCD_CA_FILE": "empty"}, "=", f"ETCD_CA_FILE={{empty!r}} {NO_CERTIFICATE}; {CA_EXPECTED}"),
    ({"ETCD_CA_FILE": "junk"}, "=", f"ETCD_CA_FILE={{junk!r}} {NO_CERTIFICATE}; {CA_EXPECTED}"),
    ({"ETCD_CA_FILE": "ca-key"}, "=", f"ETCD_CA_FILE={{ca-key!r}} {NO_CERTIFICATE}; {CA_EXPECTED}"),
    ({"ETCD_CA_FILE": "ca", "ETCD_CERT_FILE": "empty", "ETCD_KEY_FILE": "client-key"}, "^",
     f"ETCD_CERT_FILE={{empty!r}} {NO_CERTIFICATE}"),
    ({"ETCD_CA_FILE": "ca", "ETCD_CERT_FILE": "client-key", "ETCD_KEY_FILE": "client"}, "=",
     "ETCD_CERT_FILE={client-key!r} holds a private key and ETCD_KEY_FILE={client!r} a certificate: they are "
     "swapped; expected ETCD_CERT_FILE to name the client certificate and ETCD_KEY_FILE its key"),
    ({"ETCD_CA_FILE": "ca", "ETCD_CERT_FILE": "client", "ETCD_KEY_FILE": "server-key"}, "=",
     "ETCD_KEY_FILE={server-key!r} is not the private key of ETCD_CERT_FILE={client!r}; expected the key the "
     "certificate was issued for"),
    ({"ETCD_CA_FILE": "ca", "ETCD_CERT_FILE": "client", "ETCD_KEY_FILE": "junk"}, "^",
     "ETCD_KEY_FILE={junk!r} holds no PEM private key"),
], ids=["ca-empty", "ca-junk", "ca-is-a-key", "cert-empty", "cert-and-key-swapped", "key-of-another-cert",
        "key-junk"])
def test_tls_files_that_cannot_work_are_refused_at_start(tls, files, how, line):
    """A file that is readable but holds the wrong thing fails every TLS handshake later, with
    words about ssl: it is read at start and named. The process is run for real (wherever
    register.py reads the files, before anything else they are a bad configuration)."""
    expected = line.format_map(tls)
    message = refused_at_start({**HTTPS, **{name: tls[key] for name, key in files.items()}})
    if how == "=":
        assert message == expected
    else:
        assert message.startswith(expected), message


def test_tls_settings_that_belong_together(tls):
    """A client certificate goes with its key, and TLS files with https (real PEM files, so that
    the pairing is what is wrong, not the files)."""
    for files, line in [
            ({"ETCD_CERT_FILE": tls["client"]},
             "ETCD_CERT_FILE is set but ETCD_KEY_FILE is not; expected both, "
             "e.g. ETCD_KEY_FILE=/etc/ssl/etcd/client-key.pem"),
            ({"ETCD_KEY_FILE": tls["client-key"]},
             "ETCD_KEY_FILE is set but ETCD_CERT_FILE is not; expected both, "
             "e.g. ETCD_CERT_FILE=/etc/ssl/etcd/client.pem")]:
        assert refused_at_start({**GOOD, "ETCD_ENDPOINT": "https://etcd:2379", **files}) == line
    assert refused_at_start({**GOOD, "ETCD_CA_FILE": tls["ca"]}) == (
        "ETCD_CA_FILE is set but ETCD_ENDPOINT uses http; expected https endpoints with it, "
        "e.g. ETCD_ENDPOINT=https://127.0.0.1:2379")


# -- endpoints: a zone, a list without commas --------------------------------------------------

@pytest.mark.parametrize(("endpoint", "zone"), [
    ("http://[fe80::1%25lo]:2379", "%25lo"), ("[fe80::1%lo]:2379", "%lo")])
def test_an_ipv6_endpoint_with_a_zone_is_refused(endpoint, zone):
    start = (f"ETCD_ENDPOINT={endpoint!r} has an IPv6 address with a zone ({zone}), which cannot be used "
             "here")
    with pytest.raises(register.ConfigError) as refused:
        load_config([], {**GOOD, "ETCD_ENDPOINT": endpoint})
    assert str(refused.value).startswith(start), str(refused.value)
    assert refused_at_start({**GOOD, "ETCD_ENDPOINT": endpoint}).startswith(start)


def test_endpoints_separated_by_spaces_are_told_to_use_commas():
    settings = {**GOOD, "ETCD_ENDPOINT": "http://a:2379 http://b:2379"}
    with pytest.raises(register.ConfigError) as refused:
        load_config([], settings)
    assert "endpoints are separated by commas" in str(refused.value)
    message = refused_at_start(settings)
    assert message.startswith("ETCD_ENDPOINT='http://a:2379 http://b:2379' ")
    assert "endpoints are separated by commas" in message


# -- a password where it does not belong is never repeated --------------------------------------

SECRET = "Hunter2Secret"


def test_a_password_in_the_user_name_is_refused_and_never_printed():
    settings = {**GOOD, "ETCD_USERNAME": f"registrar:{SECRET}", "ETCD_PASSWORD": "another-pw"}
    with pytest.raises(register.ConfigError) as refused:
        load_config([], settings)
    assert "ETCD_USERNAME" in str(refused.value) and "colon" in str(refused.value)
    assert SECRET not in str(refused.value)
    message = refused_at_start(settings)  # stdout empty, stderr this one line: the secret is nowhere
    assert "ETCD_USERNAME" in message and "colon" in message and SECRET not in message, message


@pytest.mark.parametrize("args", [
    [f"--etcd-pass={SECRET}"], [f"--etcd-passwd={SECRET}"], ["--etcd-pass", SECRET]],
    ids=["--etcd-pass=", "--etcd-passwd=", "--etcd-pass-then-the-secret"])
def test_a_password_flag_that_does_not_exist_is_never_repeated(args):
    with pytest.raises(register.ConfigError) as refused:
        load_config(args, GOOD)
    assert "unrecognized arguments" in str(refused.value) and SECRET not in str(refused.value)
    message = refused_at_start(GOOD, *args)  # stdout empty, stderr this one line
    assert "unrecognized arguments" in message and SECRET not in message, message
