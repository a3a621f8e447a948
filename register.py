#!/usr/bin/env python3
"""docker-etcd-register: keep etcd's ``<prefix>/<host-ip>/`` equal to this host's running containers.

One instance runs on every Docker host. It writes one key per running container that publishes
ports, ``<prefix>/<host-ip>/<image>/<container-id>``, whose value is a JSON array with one object
per published port, and deletes the keys of containers that are gone. The design is a
level-triggered reconciler: Docker events only say *which* container to look at; what gets written
is always computed from Docker's and etcd's current state, so lost, duplicated or reordered events
are harmless, and a periodic full reconcile repairs whatever drifted.

Contents, in the order the data flows (each number is a section banner below; a name is used
only below the section that defines it, and the pure sections import nothing that does I/O,
which tests/test_layout.py checks):

   1. Logging          text or JSON lines, structured events, safe text
   2. Configuration    every setting defined once, parsed and validated
   3. Records          from `docker inspect` data to each index's key and value (pure)
   4. Plan             the deletes and puts from the records wanted and found (pure)
   5. Scheduling       backoff, timers, and the reconciler's work queue
   6. Registry seam    what the reconciler writes through, this host's scope, the errors
   7. etcd v2 adapter  python-etcd, a host directory with a TTL
   8. etcd v3 adapter  the HTTP gateway, one lease per host, transactions
   9. Docker           the engine adapter
  10. Liveness         the heartbeat on its own thread, and who vouches for the records
  11. Status           what the service's threads report, as one immutable snapshot
  12. Reconciler       desired state (Docker) against actual state (etcd)
  13. Events           Docker's event stream, followed for ever
  14. Health           GET /healthz
  15. CLI              the commands beside the service (`register.py healthcheck`)
  16. Main             the threads, signals and shutdown

docs/architecture.md tells the design; docs/reference.md every setting.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import http.server
import importlib.util
import ipaddress
import itertools
import json
import logging
import os
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

import backoff
import docker
import docker.errors
import requests
import requests.adapters
import urllib3

# The two etcd clients: each adapter imports its own when it is made (python-etcd pulls in
# dnspython, etcd3gw futurist: some 20 ms of start-up each that the other API need not pay).
etcd = etcd3gw = None

VERSION = "1.0.0"
PROG = "register.py"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
log = logging.getLogger("register")


# ---------------------------------------------------------------------------------------------
# 1. Logging: text or JSON lines, structured events, safe text
# ---------------------------------------------------------------------------------------------

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}

def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname.lower():7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the structured fields of the event."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _timestamp(record.created), "level": record.levelname.lower(),
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[config.log_level])
    # The libraries log every failed request on their own; this service logs each failure once,
    # with its cause and what happens next.
    for noisy in ("etcd", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def log_event(level: int, message: str, **fields) -> None:
    log.log(level, message, extra={"fields": fields})


def plain_word(text: object, limit: int = 200) -> str:
    """A name from outside (an engine ID, a role) as one unquoted word: anything but visible ASCII
    becomes `?`, so that it can neither forge a log line nor break a record."""
    return re.sub(r"[^\x21-\x7e]", "?", str(text).strip())[:limit]


def printable(text: object, limit: int = 200) -> str:
    """Text from outside (etcd keys and values, Docker's data) as it may go into one log line:
    quoted, escaped (a newline cannot forge a line) and cut to `limit` characters."""
    shown = repr(text if isinstance(text, str) else str(text))
    return shown if len(shown) <= limit else shown[:limit] + "...'"


def describe(exc: BaseException) -> str:
    """The root cause of a connection-level failure, short enough for one log line."""
    seen = exc
    for _ in range(8):
        inner = (getattr(seen, "cause", None) or getattr(seen, "reason", None)
                 or seen.__cause__ or seen.__context__)
        if not isinstance(inner, BaseException):
            break
        seen = inner
    if isinstance(seen, (TimeoutError, socket.timeout, urllib3.exceptions.TimeoutError,
                         requests.exceptions.Timeout)):
        return "timed out"
    if isinstance(seen, OSError) and seen.strerror:  # "Connection refused" -> "connection refused"
        return seen.strerror[:1].lower() + seen.strerror[1:]
    text = str(seen) or type(seen).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------------------------
# 2. Configuration: every setting defined once, parsed and validated
# ---------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """Bad configuration: reported as one line on stderr, exit code 2."""


DEFAULT_ETCD_PORT = 2379
MIN_TTL = 3
# The longest TTL and resync interval taken: far inside etcd's largest lease TTL (9,000,000,000 s)
# and what a wait on the monotonic clock can take (threading.TIMEOUT_MAX), and an hour-long TTL
# is already longer than anyone waits for a dead host's records to go.
MAX_SECONDS = 86400
MIN_RECORD_BYTES = 1024
# Host names as DNS and container networks spell them (compose names containers project_etcd_1)
HOSTNAME_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?")
# What an etcd key path may hold here: python-etcd puts keys into URLs as they are, and etcd
# resolves "." and ".." segments, so anything else could land outside the prefix
KEY_SEGMENT_RE = re.compile(r"[A-Za-z0-9._:@+-]+")  # + for digest algorithms
# scheme://credentials@ in a word of a message: never printed
SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
CREDENTIALS_RE = re.compile(rf"({SCHEME})?[^\s'\"=]*@")


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str  # as written in a URL: an IPv6 address carries its brackets
    port: int

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


def mask_credentials(text: str) -> str:
    """A setting's value with everything from its scheme (or its start) to its last `@` shown as
    `***`: a password may hold any character, `/`, `#`, `,`, a space or `@` included."""
    if "@" not in text:
        return text
    head, _, tail = text.rpartition("@")
    scheme = re.match(rf"\s*{SCHEME}", head)
    return f"{scheme.group(0) if scheme else ''}***@{tail}"


def mask_message(text: str) -> str:
    """Every word of a message that holds an `@` (argparse repeats what it was given) shown with
    `***` up to its last `@`."""
    return CREDENTIALS_RE.sub(lambda m: f"{m.group(1) or ''}***@", text)


def _problem(setting: Setting, source: str, value: str, problem: str) -> ConfigError:
    example = f"{source}={setting.example}"
    return ConfigError(f"{source}={mask_credentials(value)!r} {problem}; expected {setting.expected}, "
                       f"e.g. {example}")


CREDENTIALS_PROBLEM = "carries credentials, which do not belong in an address (they would show in logs)"


def _refuse_credentials(text: str, allow_user: bool = False) -> None:
    """User information in an address (any `@`): refused, whatever else is wrong with it. With
    `allow_user`, a bare user name (ssh://deploy@host) is not a secret."""
    if "@" in text and not (allow_user and re.fullmatch(r"ssh://[^:@/\s]+@[^@\s]+", text)):
        raise ValueError(CREDENTIALS_PROBLEM)


def _parse_endpoint(item: str) -> Endpoint:
    """One entry of ETCD_ENDPOINT; raises ValueError with what is wrong with it."""
    _refuse_credentials(item)
    url = item if "://" in item else f"http://{item}"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("has a broken [IPv6] address") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"has scheme {parts.scheme!r}, not http or https")
    if parts.netloc.count(":") > 1 and not parts.netloc.startswith("["):
        raise ValueError("has an IPv6 address without brackets, as in [fd00::1]:2379")
    if "%" in parts.netloc:  # requests and urllib3 cannot connect through a zone: refused here
        zone = parts.netloc[parts.netloc.index("%"):].split("]")[0]
        raise ValueError(f"has an IPv6 address with a zone ({zone}), which cannot be used here (give a "
                         "global or unique local address of the member)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("has more than a scheme, a host and a port")
    try:
        port = parts.port
    except ValueError as exc:
        if "out of range" in str(exc):
            raise ValueError("has a port out of range 1-65535") from None
        raise ValueError("has a port that is not a number") from None
    if port == 0:
        raise ValueError("has a port out of range 1-65535")
    host = parts.hostname or ""
    if not host:
        raise ValueError("has no host")
    address = _host_address(host)
    if address is not None and address.version == 6:
        host = f"[{address}]"  # python-etcd writes host:port as it is given
    return Endpoint(parts.scheme, host, port or DEFAULT_ETCD_PORT)


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` spells, None for a host name; raises ValueError when it is neither."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"has a host, {host!r}, that is neither an IP address nor a host name") from None
        return None


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """Parse ETCD_ENDPOINT; raises ValueError with what is wrong."""
    _refuse_credentials(text)
    items = [part.strip() for part in text.split(",")]
    for item in items:
        words = item.split()
        if len(words) > 1 and all(":" in word and _looks_like_endpoint(word) for word in words):
            raise ValueError("holds a list separated by spaces: endpoints are separated by commas, as "
                             "in http://10.0.0.1:2379,http://10.0.0.2:2379")
    if len(items) > 1 and not all(items):
        raise ValueError("has an empty entry in its list")
    endpoints = []
    for item in items:
        try:
            endpoints.append(_parse_endpoint(item))
        except ValueError as exc:
            raise ValueError(f"{exc} (in entry {item!r})" if len(items) > 1 else str(exc)) from None
    if len({e.protocol for e in endpoints}) > 1:
        raise ValueError("mixes http and https")
    return tuple(endpoints)


def _looks_like_endpoint(word: str) -> bool:
    try:
        _parse_endpoint(word)
    except ValueError:
        return False
    return True


def parse_host_ip(text: str) -> str:
    """Canonical text of HOST_IP (IPv6 compressed, lower case, IPv4-mapped as IPv4); raises
    ValueError when it is no address, or one that no other host could reach this host at."""
    if "%" in text:
        raise ValueError("is an address with a zone, which other hosts cannot use")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("is not an IPv4 or IPv6 address") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # one spelling whatever the interpreter (docs/architecture.md, "Keys")
    if address.is_unspecified:
        raise ValueError("is the unspecified address, which names no host")
    if address.version == 4 and address in ipaddress.IPv4Network("0.0.0.0/8"):
        raise ValueError("is in 0.0.0.0/8, which means this network, not a host others can reach")
    if address.is_multicast:
        raise ValueError("is a multicast address, which names no single host")
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError("is the broadcast address, which names no single host")
    return str(address)


def host_ip_warnings(host_ip: str) -> list[str]:
    """An address that only this host (loopback) or its link (link-local) can reach: allowed, for
    a single-host demo, but worth one line in the log."""
    address = ipaddress.ip_address(host_ip)
    if address.is_loopback:
        return [f"HOST_IP {host_ip} is a loopback address: no other host can reach the ports "
                "registered under it (fine for a single-host demo)"]
    if address.is_link_local:
        return [f"HOST_IP {host_ip} is a link-local address: only hosts on the same link can reach "
                "the ports registered under it"]
    return []


def parse_prefix(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("does not start with /")
    segments = text.strip("/").split("/")
    if segments == [""]:
        raise ValueError("is the root, which would mix the registry with everything else")
    for segment in segments:
        if segment in (".", ".."):
            raise ValueError(f"has a {segment!r} segment, which etcd would resolve to another path")
        if not segment:
            raise ValueError("has an empty path segment")
        if segment.startswith("_"):
            raise ValueError(f"has a segment, {segment!r}, that starts with _, which etcd v2 hides from "
                             "listings")
        odd = re.sub(r"[A-Za-z0-9._:@-]", "", segment)
        if odd:
            raise ValueError(f"has a character, {odd[0]!r}, that does not belong in an etcd key path")
    return "/" + "/".join(segments)


def parse_docker_host(text: str) -> str:
    """DOCKER_HOST as the Docker SDK will take it; raises ValueError when it can never work (a
    Docker engine that is merely down is waited for instead)."""
    _refuse_credentials(text, allow_user=text.startswith("ssh://"))
    if "://" not in text and not re.fullmatch(r"[0-9.]+:[0-9]+|\[[0-9A-Fa-f:.]+\]:[0-9]+", text):
        raise ValueError("has no scheme")
    scheme = text.split("://", 1)[0] if "://" in text else "tcp"
    if scheme == "npipe":
        raise ValueError("is a Windows named pipe, which this host cannot open")
    if scheme == "fd":
        raise ValueError("is systemd's socket activation address, which only dockerd itself can use")
    if scheme == "ssh" and importlib.util.find_spec("paramiko") is None:
        raise ValueError("needs the Docker SDK's ssh support (pip install paramiko), which is not "
                         "installed")
    if scheme not in ("unix", "tcp", "http", "https", "ssh"):
        raise ValueError(f"has scheme {scheme!r}, not unix, tcp or ssh")
    try:
        docker.utils.parse_host(text)
    except docker.errors.DockerException as exc:
        if "port is required" in str(exc):
            raise ValueError("has no port (Docker listens on 2375, or 2376 with TLS)") from None
        raise ValueError("is not an address the Docker SDK can use") from None
    except ValueError as exc:  # urllib's words for a port that is no port
        if "out of range" in str(exc):
            raise ValueError("has a port out of range 1-65535") from None
        raise ValueError("has a port that is not a number") from None
    if scheme in ("tcp", "http", "https"):
        _host_address(urlsplit(text if "://" in text else f"tcp://{text}").hostname or "")
    return text


def parse_seconds(text: str, minimum: int, allow_zero: bool) -> int:
    if re.fullmatch(r"-[0-9]+", text):
        raise ValueError("is negative")
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError("is not a whole number of seconds")
    value = int(text)
    if value == 0 and allow_zero:
        return 0
    if value < minimum:
        raise ValueError(f"is below {minimum}")
    if value > MAX_SECONDS:
        raise ValueError(f"is above {MAX_SECONDS}")
    return value


def parse_bytes(text: str, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError("is not a whole number of bytes")
    if int(text) < minimum:
        raise ValueError(f"is below {minimum}")
    return int(text)


def parse_file(text: str) -> str:
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError("is not a readable file")
    return text


class SecretInValue(ValueError):
    """A problem whose value must not be echoed (it may hold a password)."""


def parse_username(text: str) -> str:
    if ":" in text:  # etcdctl's name:password: what follows the colon is a password
        raise SecretInValue("holds a colon: a name:password pair is not taken here (the password "
                            "would show in logs and ps); expected the user name alone, with its "
                            "password in ETCD_PASSWORD or ETCD_PASSWORD_FILE, e.g. ETCD_USERNAME=registrar")
    if re.search(r"[\s\x00-\x1f\x7f]", text):
        raise ValueError("holds a space, a colon or a control character")
    return text


def read_password_file(path: str) -> str:
    """The password in `path`, without its trailing newline; raises ValueError (never naming the
    password) when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as file:
            password = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot be read ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8'})"
                         ) from None
    password = password[:-1] if password.endswith("\n") else password
    password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise ValueError("is empty")
    return password


def parse_password_file(text: str) -> str:
    parse_file(text)
    read_password_file(text)
    return text


def parse_listen_address(text: str) -> tuple[str, int]:
    """(host, port) to listen on: an IP address or localhost, and a port; IPv6 in brackets."""
    if "://" in text:
        raise ValueError("is not host:port (no scheme: it is an address to listen on)")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([^:]*)|([^:\[\]]+):([^:]*)", text)
    if not match:
        raise ValueError("is not host:port (an IPv6 address goes in brackets)"
                         if text.count(":") > 1 and not text.startswith("[") else "is not host:port")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"has host {host!r}, which is neither an IP address nor localhost") from None
        if (address.version == 6) != bool(match.group(1)):
            raise ValueError("is not host:port (only an IPv6 address goes in brackets)")
    if not re.fullmatch(r"[0-9]+", port):
        raise ValueError("has a port that is not a number")
    if not 1 <= int(port) <= 65535:
        raise ValueError("has a port out of range 1-65535")
    return host, int(port)


def parse_choice(choices: Iterable[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError("is not one of the choices")
        return text.lower()
    return parse


@dataclass(frozen=True)
class Setting:
    """One setting, defined once: its environment variable, flag, default, what a good value
    looks like, help text, the Config attribute it fills and the parser that makes it one.
    The settings table of docs/reference.md is checked against these (tests/test_layout.py)."""
    env: str  # "": a flag alone (a switch)
    flag: str  # "": an environment variable alone (a secret)
    default: str | None  # None: required; "": optional, unset by default
    expected: str  # what a good value looks like, in words
    example: str
    help: str
    attr: str = ""  # the Config field it fills
    parse: Callable[[str], object] = str
    unset: object = None  # what an optional setting left unset means
    switch: bool = False  # a flag without a value (store_true), off by default

    @property
    def name(self) -> str:
        return self.env or self.flag

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.switch:
            parser.add_argument(self.flag, dest=self.attr, action="store_true", help=self.help)
            return
        default = f" (default: {self.default})" if self.default else ""
        parser.add_argument(self.flag, dest=self.env, metavar=self.env, default=None,
                            help=f"{self.help} [env {self.env}]{default}")

    def typed_default(self) -> object:
        """The value a Config has when the setting is not given."""
        if self.switch:
            return False
        return self.parse(self.default) if self.default else self.unset


SETTINGS = (
    Setting("ETCD_ENDPOINT", "--etcd-endpoint", None,
            "host:port, http://host:port or https://host:port, or a comma-separated list of them",
            "http://127.0.0.1:2379",
            "etcd endpoint(s); a comma-separated list for a cluster; port defaults to 2379; "
            "IPv6 in brackets ([fd00::1]:2379). Required.",
            attr="etcd_endpoints", parse=parse_endpoints),
    Setting("ETCD_API", "--etcd-api", "2",
            "2 or 3", "3",
            "etcd API to register with: 2 (the original's keyspace, etcdctl ls) or 3 (every current "
            "etcd; leases). The two keyspaces are separate",
            attr="etcd_api", parse=lambda text: int(parse_choice(("2", "3"))(text))),
    Setting("HOST_IP", "--host-ip", None,
            "this host's IPv4 or IPv6 address", "10.0.0.1",
            "this host's address, as other hosts reach it; the second level of every key. Required.",
            attr="host_ip", parse=parse_host_ip),
    Setting("REGISTER_PREFIX", "--prefix", "/registered",
            "an absolute etcd path below the root, of letters, digits and . _ : @ - between slashes",
            "/registered", "the top of the registry tree",
            attr="prefix", parse=parse_prefix),
    Setting("DOCKER_HOST", "--docker-host", "",
            "unix:///path/to/docker.sock, tcp://host:port, or ssh://user@host with paramiko installed",
            "unix:///var/run/docker.sock",
            f"the Docker engine's address, as for the Docker CLI (default: {DEFAULT_DOCKER_HOST}); "
            "DOCKER_TLS_VERIFY and DOCKER_CERT_PATH apply as for the Docker CLI",
            attr="docker_host", parse=parse_docker_host, unset=DEFAULT_DOCKER_HOST),
    Setting("REGISTER_MAX_RECORD_BYTES", "--max-record-bytes", str(512 * 1024),
            "a whole number of bytes from 1024 up", str(512 * 1024),
            "the largest record value written; a container whose record would be larger (thousands "
            "of published ports) is not registered, with a warning",
            attr="max_record_bytes", parse=lambda text: parse_bytes(text, MIN_RECORD_BYTES)),
    Setting("REGISTER_TTL", "--ttl", "60",
            "0 (no TTL) or a whole number of seconds from 3 to 86400 (one day)", "60",
            "seconds this host's keys outlive this service (v2: the host directory's TTL; v3: its "
            "lease); refreshed every TTL/3; 0 turns it off",
            attr="ttl", parse=lambda text: parse_seconds(text, MIN_TTL, allow_zero=True)),
    Setting("REGISTER_RESYNC", "--resync", "60",
            "a whole number of seconds from 1 to 86400 (one day)", "60",
            "seconds between full reconciles (the safety net that repairs any drift)",
            attr="resync", parse=lambda text: parse_seconds(text, 1, allow_zero=False)),
    Setting("ETCD_CA_FILE", "--etcd-ca-file", "",
            "a readable PEM file", "/etc/ssl/etcd/ca.pem",
            "CA certificate(s) to verify etcd's server certificate with (https endpoints; the "
            "system's CAs by default)",
            attr="etcd_ca_file", parse=parse_file),
    Setting("ETCD_CERT_FILE", "--etcd-cert-file", "",
            "a readable PEM file", "/etc/ssl/etcd/client.pem",
            "client certificate for etcd's client certificate authentication (with ETCD_KEY_FILE)",
            attr="etcd_cert_file", parse=parse_file),
    Setting("ETCD_KEY_FILE", "--etcd-key-file", "",
            "a readable PEM file", "/etc/ssl/etcd/client-key.pem",
            "the client certificate's private key (with ETCD_CERT_FILE)",
            attr="etcd_key_file", parse=parse_file),
    Setting("ETCD_USERNAME", "--etcd-username", "",
            "an etcd user name, without spaces, colons or control characters", "registrar",
            "etcd user to authenticate as (with ETCD_PASSWORD or ETCD_PASSWORD_FILE)",
            attr="etcd_username", parse=parse_username),
    Setting("ETCD_PASSWORD_FILE", "--etcd-password-file", "",
            "a readable file holding the password (a trailing newline is ignored)",
            "/run/secrets/etcd-password",
            "file holding ETCD_USERNAME's password (read again at each authentication); "
            "ETCD_PASSWORD, in the environment only, gives it directly",
            attr="etcd_password_file", parse=parse_password_file),
    Setting("ETCD_PASSWORD", "", "",
            "the etcd user's password", "(secret)",
            "ETCD_USERNAME's password; environment only, never a flag (it would show in ps)",
            attr="etcd_password", parse=lambda text: text),
    Setting("REGISTER_HEALTH_ADDR", "--health-addr", "",
            "an IP address (IPv6 in brackets) or localhost, a colon and a port", "127.0.0.1:9109",
            "serve GET /healthz on this address (off when unset): 200 while Docker's events are "
            "followed, etcd answers and full reconciles succeed, 503 with the reasons otherwise",
            attr="health_addr", parse=parse_listen_address),
    Setting("LOG_LEVEL", "--log-level", "info",
            "debug, info, warning or error", "info", "log verbosity",
            attr="log_level", parse=parse_choice(LOG_LEVELS)),
    Setting("LOG_FORMAT", "--log-format", "text",
            "text or json", "json", "text, or json for one JSON object per line",
            attr="log_format", parse=parse_choice(("text", "json"))),
    Setting("", "--deregister-on-exit", "", "", "", "on SIGTERM/SIGINT delete this host's subtree before "
            "exiting (by default records stay, so a restart makes nothing flap)",
            attr="deregister_on_exit", switch=True),
)
SETTING = {s.env: s for s in SETTINGS if s.env}


def _default(env: str) -> object:
    return SETTING[env].typed_default()


@dataclass(frozen=True)
class Config:
    """The settings, validated: one field per Setting (its `attr`), whose default is the
    setting's own (a test checks that the two lists are one)."""
    etcd_endpoints: tuple[Endpoint, ...]
    host_ip: str
    prefix: str
    ttl: int
    resync: int
    log_level: str
    log_format: str
    deregister_on_exit: bool
    etcd_ca_file: str | None = _default("ETCD_CA_FILE")
    etcd_cert_file: str | None = _default("ETCD_CERT_FILE")
    etcd_key_file: str | None = _default("ETCD_KEY_FILE")
    docker_host: str = _default("DOCKER_HOST")
    max_record_bytes: int = _default("REGISTER_MAX_RECORD_BYTES")
    etcd_api: int = _default("ETCD_API")
    etcd_username: str | None = _default("ETCD_USERNAME")
    etcd_password: str | None = field(default=_default("ETCD_PASSWORD"), repr=False)  # never printed
    etcd_password_file: str | None = _default("ETCD_PASSWORD_FILE")
    health_addr: tuple[str, int] | None = _default("REGISTER_HEALTH_ADDR")  # (host, port) of /healthz

    @property
    def host_dir(self) -> str:
        return f"{self.prefix}/{self.host_ip}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, as for every other bad configuration
        if re.search(r"--etcd-password(?!-file)", message):  # what follows it may be the password
            raise ConfigError("there is no --etcd-password flag (a password on the command line shows "
                              "in ps); expected ETCD_PASSWORD in the environment or --etcd-password-file")
        match = re.match(r"unrecognized arguments: (.*)", message)
        if match:  # what was given may be a password (--etcd-pass=..., or the word after it)
            words = [word.split("=", 1)[0] + ("=***" if "=" in word else "") if word.startswith("-")
                     else "***" for word in match.group(1).split(" ")]
            raise ConfigError(f"unrecognized arguments: {' '.join(words)} (values hidden); see "
                              f"{PROG} --help for the flags")
        raise ConfigError(mask_message(message))


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Register this host's running containers and their published ports in etcd "
                    "(v2 or v3 API) under <prefix>/<host-ip>/<image>/<container-id>, and keep them "
                    "equal to the truth. Every setting is an environment variable and a flag (the "
                    "flag wins), except ETCD_PASSWORD, which is read from the environment only. "
                    "Docker is reached as the Docker CLI does (DOCKER_HOST, DOCKER_TLS_VERIFY, "
                    "DOCKER_CERT_PATH; the local socket by default). `register.py healthcheck` "
                    "asks a running service's health server (--health-addr) and exits 0 when it "
                    "is healthy, 1 otherwise.")
    for s in SETTINGS:
        if s.flag:
            s.add_to(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> Config:
    """Settings from flags, then the environment, then defaults; each one validated."""
    args = build_arg_parser().parse_args(argv)
    values = {s.env: setting_value(s, getattr(args, s.env, None), environ) for s in SETTINGS if s.env}
    _check_tls(values)
    _check_auth(values)
    _check_docker_tls(values["DOCKER_HOST"], environ)
    return Config(**{s.attr: getattr(args, s.attr) if s.switch else values[s.env] for s in SETTINGS})


def setting_value(s: Setting, flag_value: str | None, environ: Mapping[str, str]) -> object:
    """One setting from its flag, then the environment, then its default; validated."""
    if flag_value is not None:
        source, text = s.flag, flag_value
    elif s.env in environ:
        source, text = s.env, environ[s.env]
    elif s.default is not None:
        source, text = s.env, s.default
    else:
        raise ConfigError(f"{s.env} is not set (nor {s.flag}); expected {s.expected}, "
                          f"e.g. {s.env}={s.example}")
    if not text.strip():
        if s.default == "":  # an optional setting, left empty: unset
            return s.unset
        raise ConfigError(f"{source} is empty; expected {s.expected}, e.g. {source}={s.example}")
    try:
        return s.parse(text if s.env == "ETCD_PASSWORD" else text.strip())
    except SecretInValue as exc:
        raise ConfigError(f"{source} {exc}") from None
    except ValueError as exc:
        raise _problem(s, source, text, str(exc)) from None


def _check_auth(values: Mapping[str, object]) -> None:
    """A user name goes with exactly one source of its password, and a password with a user."""
    user, password, password_file = (values["ETCD_USERNAME"], values["ETCD_PASSWORD"],
                                     values["ETCD_PASSWORD_FILE"])
    if password and password_file:
        raise ConfigError("ETCD_PASSWORD and ETCD_PASSWORD_FILE are both set; expected one of them, "
                          "e.g. ETCD_PASSWORD_FILE=/run/secrets/etcd-password")
    if (password or password_file) and not user:
        given = "ETCD_PASSWORD" if password else "ETCD_PASSWORD_FILE"
        raise ConfigError(f"{given} is set but ETCD_USERNAME is not; expected both, "
                          "e.g. ETCD_USERNAME=registrar")
    if user and not (password or password_file):
        raise ConfigError("ETCD_USERNAME is set but neither ETCD_PASSWORD nor ETCD_PASSWORD_FILE is; "
                          "expected one of them, e.g. ETCD_PASSWORD_FILE=/run/secrets/etcd-password")


def _check_docker_tls(docker_host: str | None, environ: Mapping[str, str]) -> None:
    """DOCKER_TLS_VERIFY and DOCKER_CERT_PATH name files that must exist: checked once, here."""
    try:
        docker.utils.kwargs_from_env(environment={**environ, "DOCKER_HOST": docker_host or ""})
    except docker.errors.DockerException:
        path = environ.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
        missing = [name for name in ("ca.pem", "cert.pem", "key.pem")
                   if not os.access(os.path.join(path, name), os.R_OK)]
        raise ConfigError(f"DOCKER_CERT_PATH={path!r} lacks a readable {', '.join(missing)}, which "
                          "DOCKER_TLS_VERIFY or DOCKER_CERT_PATH asks for; expected the Docker CLI's TLS "
                          "files there, e.g. DOCKER_CERT_PATH=/etc/docker/tls") from None


def _check_tls(values: Mapping[str, object]) -> None:
    """The TLS files go with https endpoints, and a client certificate with its key."""
    cert, key = SETTING["ETCD_CERT_FILE"], SETTING["ETCD_KEY_FILE"]
    for given, missing in ((cert, key), (key, cert)):
        if values[given.env] and not values[missing.env]:
            raise ConfigError(f"{given.env} is set but {missing.env} is not; expected both, "
                              f"e.g. {missing.env}={missing.example}")
    uses_http = values["ETCD_ENDPOINT"][0].protocol == "http"
    for name in ("ETCD_CA_FILE", "ETCD_CERT_FILE"):
        if values[name] and uses_http:
            raise ConfigError(f"{name} is set but ETCD_ENDPOINT uses http; expected https endpoints "
                              "with it, e.g. ETCD_ENDPOINT=https://127.0.0.1:2379")
    _load_tls(values["ETCD_CA_FILE"], values["ETCD_CERT_FILE"], values["ETCD_KEY_FILE"])


NOT_A_CERTIFICATE = "holds no PEM certificate (it is empty, or holds something else, such as a key)"


def _pem_kinds(path: str) -> set[str]:
    """What the PEM blocks of a file are ("CERTIFICATE", "PRIVATE KEY", ...), read as text; an
    old-style encrypted key ("Proc-Type: 4,ENCRYPTED") counts as "ENCRYPTED"."""
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(1024 * 1024)
    except OSError:
        return set()
    kinds = set(re.findall(r"-----BEGIN ([A-Z0-9 ]+)-----", text))
    return kinds | ({"ENCRYPTED"} if "Proc-Type: 4,ENCRYPTED" in text else set())


def _load_tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> None:
    """The TLS files are loaded once here, as the connections will load them: a file that cannot
    work is named now, not retried for ever with OpenSSL's words."""
    def problem(name: str, path: str, text: str) -> ConfigError:
        return _problem(SETTING[name], name, path, text)

    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, ValueError, OSError):
            raise problem("ETCD_CA_FILE", ca_file, NOT_A_CERTIFICATE) from None
    if not cert_file or not key_file:
        return
    cert_kinds, key_kinds = _pem_kinds(cert_file), _pem_kinds(key_file)
    if any("PRIVATE KEY" in kind for kind in cert_kinds) and "CERTIFICATE" in key_kinds:
        raise ConfigError(f"ETCD_CERT_FILE={cert_file!r} holds a private key and ETCD_KEY_FILE={key_file!r} "
                          "a certificate: they are swapped; expected ETCD_CERT_FILE to name the client "
                          "certificate and ETCD_KEY_FILE its key")
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert_file)
    except (ssl.SSLError, ValueError, OSError):
        raise problem("ETCD_CERT_FILE", cert_file, NOT_A_CERTIFICATE) from None
    if any("ENCRYPTED" in kind for kind in key_kinds):
        raise problem("ETCD_KEY_FILE", key_file, "holds an encrypted private key, which needs a "
                      "passphrase that nothing here could give")
    if not any("PRIVATE KEY" in kind for kind in key_kinds):
        raise problem("ETCD_KEY_FILE", key_file, "holds no PEM private key")

    def no_passphrase() -> str:
        raise ValueError("a passphrase was asked for")

    try:
        ssl.create_default_context().load_cert_chain(cert_file, key_file, password=no_passphrase)
    except (ssl.SSLError, ValueError, OSError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc).lower():
            raise ConfigError(f"ETCD_KEY_FILE={key_file!r} is not the private key of ETCD_CERT_FILE="
                              f"{cert_file!r}; expected the key the certificate was issued for") from None
        raise problem("ETCD_KEY_FILE", key_file, f"cannot be loaded with ETCD_CERT_FILE ({describe(exc)})"
                      ) from None


# ---------------------------------------------------------------------------------------------
# 3. Records: from `docker inspect` data to each index's key and value. Pure.
# ---------------------------------------------------------------------------------------------

class RecordError(ValueError):
    """Docker reported data that cannot be turned into records."""


class Entry(NamedTuple):
    """What one container contributes to the registry: one record (key, value) under each index
    it is in, and what names it in a log line. Today there is one index, the host index
    (`host_key`); another is one more key function here and one more key space of the host's
    scope (HostScope)."""
    container_id: str
    name: str
    image: str  # as Docker reports it (Config.Image), for logs
    records: tuple[tuple[str, str], ...]  # (key, value) under each index, the host index first
    ports: str  # for logs: 80/tcp=10.0.0.1:49153,...

    @property
    def key(self) -> str:
        """The key under the host index."""
        return self.records[0][0]

    @property
    def value(self) -> str:
        return self.records[0][1]

    def index_keys(self) -> set[str]:
        """Its key under every index."""
        return {key for key, _ in self.records}


CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}")
PORT_KEY_RE = re.compile(r"([0-9]{1,5})/(tcp|udp|sctp)")
IMAGE_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*")


def image_key(image: object) -> str:
    """The image part of a key: `:latest` made explicit, every `/` replaced by `::`."""
    if not isinstance(image, str) or not image:
        raise RecordError(f"image reference {image!r} is empty or not text")
    reference = image
    if "@" not in reference and ":" not in reference.rsplit("/", 1)[-1]:
        reference += ":latest"
    key = reference.replace("/", "::")
    if not IMAGE_KEY_RE.fullmatch(key):
        raise RecordError(f"image reference {image!r} has characters that cannot be part of a key")
    return key


def _port_number(text: object, what: str) -> int:
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise RecordError(f"{what} {text!r} is not a port number")
    return int(text)


def _port_key(text: object) -> tuple[int, str]:
    match = PORT_KEY_RE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise RecordError(f"port {text!r} is not of the form 80/tcp")
    return _port_number(match.group(1), "container port"), match.group(2)


def _advertised_ip(host_ip_binding: object, host_ip: str) -> str | None:
    """The address to advertise for a binding; None for loopback-only bindings."""
    if host_ip_binding in (None, ""):  # Docker's way of saying every address
        return host_ip
    try:
        address = ipaddress.ip_address(host_ip_binding)
    except (ValueError, TypeError):
        raise RecordError(f"binding address {host_ip_binding!r} is not an IP address") from None
    if address.is_loopback:
        return None
    return host_ip if address.is_unspecified else str(address)  # 0.0.0.0 and :: are wildcards


def port_records(inspect: Mapping, host_ip: str) -> list[tuple[int, str, str, int]]:
    """(private port, type, advertised ip, public port) for every published port, sorted, unique."""
    host_config = inspect.get("HostConfig") or {}
    if host_config.get("NetworkMode") == "host":
        exposed = (inspect.get("Config") or {}).get("ExposedPorts") or {}
        if not isinstance(exposed, Mapping):
            raise RecordError("Config.ExposedPorts is not a mapping")
        return sorted({(port, kind, host_ip, port) for port, kind in map(_port_key, exposed)})
    ports = (inspect.get("NetworkSettings") or {}).get("Ports") or {}
    if not isinstance(ports, Mapping):
        raise RecordError("NetworkSettings.Ports is not a mapping")
    records = set()
    for port_key, bindings in ports.items():
        private, kind = _port_key(port_key)
        if bindings is None:  # exposed, not published
            continue
        if not isinstance(bindings, list):
            raise RecordError(f"bindings of {port_key} are not a list")
        for binding in bindings:
            if not isinstance(binding, Mapping):
                raise RecordError(f"a binding of {port_key} is not a mapping")
            public = _port_number(binding.get("HostPort"), f"host port of {port_key}")
            ip = _advertised_ip(binding.get("HostIp"), host_ip)
            if ip is not None:
                records.add((private, kind, ip, public))
    return sorted(records)  # by private port, type, ip, public port: the contract's order


def is_running(inspect: Mapping) -> bool:
    """Running or paused (paused containers resume where they were); not restarting."""
    state = inspect.get("State") or {}
    return bool(state.get("Running")) and not state.get("Restarting")


IGNORE_LABEL = "register.ignore"  # "true": never registered (the registrar's own image has it)


def ignored(inspect: Mapping) -> bool:
    """Whether the container is labelled register.ignore=true (any case); labels of another shape
    than Docker's are a RecordError, like any other odd data."""
    labels = (inspect.get("Config") or {}).get("Labels")
    if labels is None:
        return False
    if not isinstance(labels, Mapping):
        raise RecordError(f"its labels are a {type(labels).__name__}, not a mapping")
    value = labels.get(IGNORE_LABEL)
    return isinstance(value, str) and value.strip().lower() == "true"


def container_name(inspect: Mapping) -> str:
    name = inspect.get("Name")
    return name.lstrip("/") if isinstance(name, str) and name else "?"


class RecordTooLarge(RecordError):
    """The container's record would be larger than REGISTER_MAX_RECORD_BYTES."""

    @classmethod
    def of(cls, size: int, ports: int, max_bytes: int) -> RecordTooLarge:
        return cls(f"its record would take {size} bytes for {ports} published port(s), over "
                   f"REGISTER_MAX_RECORD_BYTES={max_bytes}")


# One object of a value without its variable parts: their lengths are added to it
RECORD_OBJECT_BYTES = len('{"container":"","image":"","ip":"","public_port":"","private_port":"",'
                          '"port_type":""}')


def record_bytes(records: Iterable[tuple], container_id: str, image_part: str) -> int:
    """The length of the value these (private, type, ip, public) records make, computed without
    making it (every character of a record is plain ASCII, so JSON escapes none)."""
    fixed = RECORD_OBJECT_BYTES + len(container_id) + len(image_part)
    return 1 + sum(fixed + 1 + len(ip) + len(str(public)) + len(str(private)) + len(kind)
                   for private, kind, ip, public in records)


CANONICAL_PORT_KEY_RE = re.compile(r"([1-9][0-9]{0,4})/(tcp|udp|sctp)")


def _host_mode_size(inspect: Mapping, host_ip: str, container_id: str) -> tuple[int, int] | None:
    """(value bytes, ports) of a host-network container with many exposed ports, counted from the
    port names alone: a container exposing 1-65535 over tcp and udp would otherwise cost a set of
    131,070 records (26 MB) just to find out that it is too large. None when this cannot tell (few
    ports, or a name in another spelling than Docker's, where the ordinary path decides)."""
    config = inspect.get("Config") or {}
    exposed = config.get("ExposedPorts")
    if (inspect.get("HostConfig") or {}).get("NetworkMode") != "host" or not isinstance(exposed, Mapping) \
            or len(exposed) < 1000:
        return None
    def record(name: object) -> tuple[str, str, str, str]:
        match = CANONICAL_PORT_KEY_RE.fullmatch(name) if isinstance(name, str) else None
        if not match or int(match.group(1)) > 65535:
            raise RecordError(f"port {name!r} is not in Docker's spelling")
        return match.group(1), match.group(2), host_ip, match.group(1)

    try:  # distinct names in Docker's spelling are distinct records: no set of them is needed
        size = record_bytes(map(record, exposed), container_id, image_key(config.get("Image")))
    except RecordError:
        return None
    return size, len(exposed)


def desired_entry(inspect: Mapping, host_ip: str, prefix: str,
                  max_bytes: int | None = None) -> Entry | None:
    """The key and value a container should have; None when it is not running, is labelled
    register.ignore=true, or publishes nothing.

    Raises RecordError when Docker's data cannot be turned into records (also data of another
    shape than Docker's: a string where a mapping belongs), RecordTooLarge when the value would be
    over `max_bytes` (checked before the value is made: thousands of ports would cost tens of MB).
    """
    try:
        return _desired_entry(inspect, host_ip, prefix, max_bytes)
    except RecordError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        raise RecordError(f"Docker reported data of an unexpected shape "
                          f"({type(exc).__name__}: {printable(str(exc), 120)})") from None


def _desired_entry(inspect: Mapping, host_ip: str, prefix: str, max_bytes: int | None) -> Entry | None:
    container_id = inspect.get("Id")
    if not isinstance(container_id, str) or not CONTAINER_ID_RE.fullmatch(container_id):
        raise RecordError(f"container id {container_id!r} is not 64 hex digits")
    if not is_running(inspect) or ignored(inspect):
        return None
    counted = _host_mode_size(inspect, host_ip, container_id) if max_bytes is not None else None
    if counted is not None and counted[0] > max_bytes:
        raise RecordTooLarge.of(*counted, max_bytes)
    records = port_records(inspect, host_ip)
    if not records:
        return None
    image = (inspect.get("Config") or {}).get("Image")
    image_part = image_key(image)
    if max_bytes is not None:
        size = record_bytes(records, container_id, image_part)
        if size > max_bytes:
            raise RecordTooLarge.of(size, len(records), max_bytes)
    # The bytes json.dumps(..., separators=(",", ":")) would give, without a dict per port (131,070
    # ports would cost 50 MB of them): every field is plain ASCII that JSON escapes nowhere (a hex
    # id, an image part of key characters, an address, digits, tcp/udp/sctp).
    value = "[" + ",".join(
        f'{{"container":"{container_id}","image":"{image_part}","ip":"{ip}","public_port":"{public}",'
        f'"private_port":"{private}","port_type":"{kind}"}}'
        for private, kind, ip, public in records) + "]"
    return Entry(container_id, container_name(inspect), image,
                 ((host_key(prefix, host_ip, image_part, container_id), value),), ports_summary(records))


def host_key(prefix: str, host_ip: str, image_part: str, container_id: str) -> str:
    """The host index: every container of a host below <prefix>/<HOST_IP>/, by image."""
    return f"{prefix}/{host_ip}/{image_part}/{container_id}"


def inspect_from_summary(summary: Mapping) -> dict | None:
    """What the records need of `docker inspect`, from one entry of Docker's container list.

    One list request describes every container, where inspecting takes one request each (the
    bulk of a full reconcile). None when the list cannot tell: in host network mode the records
    come from the exposed ports, which the list does not show; and when the list shows the image
    id, the container's reference may have been a tag that moved since (Config.Image keeps it).
    """
    try:
        image, state, mode = summary["Image"], summary["State"], summary["HostConfig"]["NetworkMode"]
        if mode == "host" or not isinstance(image, str) or image == summary.get("ImageID") \
                or not isinstance(state, str):
            return None
        ports: dict[str, list | None] = {}
        for port in summary.get("Ports") or []:
            name = f"{int(port['PrivatePort'])}/{port['Type']}"
            if "PublicPort" not in port:  # exposed, not published
                ports.setdefault(name, None)
                continue
            bindings = ports.get(name) or []
            bindings.append({"HostIp": port.get("IP", ""), "HostPort": str(int(port["PublicPort"]))})
            ports[name] = bindings
        return {"Id": summary["Id"], "Name": (summary.get("Names") or [""])[0],
                "State": {"Running": state in ("running", "paused"), "Restarting": state == "restarting"},
                "Config": {"Image": image, "Labels": summary.get("Labels")},
                "HostConfig": {"NetworkMode": mode},
                "NetworkSettings": {"Ports": ports}}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return None  # odd list data: inspecting the container will tell


LOGGED_PORTS = 20  # a log line names this many ports at most


def ports_summary(records: Iterable[tuple]) -> str:
    """(private, type, ip, public) records as log text: 80/tcp=10.0.0.1:49153,53/udp=[fd00::1]:53"""
    parts = [f"{private}/{kind}=" + (f"[{ip}]:{public}" if ":" in ip else f"{ip}:{public}")
             for private, kind, ip, public in records]
    if len(parts) > LOGGED_PORTS:
        return ",".join(parts[:LOGGED_PORTS]) + f",... ({len(parts)} ports)"
    return ",".join(parts)


def key_container_id(key: str) -> str:
    """Every index's key ends with the id of the container it is about."""
    return key.rsplit("/", 1)[-1]


def shown(text: object) -> str:
    """Text found in etcd, for a log line: as it is when it is plain printable ASCII of a sane
    length, quoted and escaped otherwise (a newline in a junk value must not forge a log line)."""
    plain = isinstance(text, str) and re.fullmatch(r"[\x21-\x7e]{1,300}", text)
    return text if plain else printable(text)


def describe_record(key: str, value: str) -> str:
    """A found record, for the log line of its removal: what it advertised, when it can tell."""
    try:
        records = json.loads(value)
        ports = ports_summary((r["private_port"], r["port_type"], r["ip"], r["public_port"])
                              for r in records)
        return (f"record of {shown(records[0]['container'][:12])} image {shown(records[0]['image'])} "
                f"ports {shown(ports)} ({shown(key)})")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"key {shown(key)}"


# ---------------------------------------------------------------------------------------------
# 4. Plan: what to write and delete, from the records wanted and the records found. Pure.
# ---------------------------------------------------------------------------------------------

UNKNOWN = object()  # a container whose records are left as they are this time (see Reconciler)


def removal_reason(running: bool) -> str:
    return "container no longer runs or publishes a port" if running else "container stopped or gone"


class Registration(NamedTuple):
    """One container's records to write: logged as one line once all of them are written."""
    entry: Entry
    keys: tuple[str, ...]  # those of its records that are missing, different, or detached
    existed: bool  # the container had a record already: "updated", not "registered"


class Removal(NamedTuple):
    """Keys to delete, logged as one line once all are gone: a registered container's (`entry`,
    as it was registered), or one key found in etcd that no container wants (`entry` None, `why`
    says what it held)."""
    keys: tuple[str, ...]
    entry: Entry | None
    why: str


class Plan(NamedTuple):
    removals: tuple[Removal, ...]
    registrations: tuple[Registration, ...]
    untouched: tuple[Entry, ...]  # every record already right: nothing is written for them
    held: frozenset  # ids of containers whose records are left as they are (UNKNOWN)

    @property
    def deletes(self) -> list[str]:
        return [key for removal in self.removals for key in removal.keys]

    @property
    def puts(self) -> list[tuple[str, str]]:
        return [(key, dict(r.entry.records)[key]) for r in self.registrations for key in r.keys]

    def keep(self, found: Iterable[str]) -> set[str]:
        """Every key that is there once the plan is applied, of those `found` and those put."""
        return (set(found) | {key for key, _ in self.puts}) - set(self.deletes)


def plan(wanted: Mapping[str, object], found: Mapping[str, str], known: Mapping[str, Entry],
         running: Iterable[str] = (), detached: Iterable[str] = ()) -> Plan:
    """The changes that make `found` (key -> value, as etcd holds it) hold exactly what `wanted`
    (container id -> Entry, None for no record, or UNKNOWN) asks for.

    Every key of `found` that no wanted record has goes, unless its container is UNKNOWN: a
    full reconcile passes everything this host holds, an event passes only what is known of the
    containers it names. `known` (container id -> Entry as it was registered) says what a key
    that goes was; a container in `running` runs still (its record goes because it publishes
    nothing now). A `detached` key is written again even when its value is right (v3: not on
    this host's lease).
    """
    detached = set(detached)
    running = set(running)
    registrations, untouched = [], []
    for want in wanted.values():
        if isinstance(want, Entry):
            keys = tuple(key for key, value in want.records if found.get(key) != value or key in detached)
            if keys:
                registrations.append(Registration(want, keys, any(key in found for key in want.index_keys())))
            else:
                untouched.append(want)
    gone: dict[str, list[str]] = {}  # container id -> its registered keys that go
    stale = []
    for key, value in found.items():
        container_id = key_container_id(key)
        want = wanted.get(container_id)
        if want is UNKNOWN or (isinstance(want, Entry) and key in want.index_keys()):
            continue
        had = known.get(container_id)
        if had is not None and key in had.index_keys():
            gone.setdefault(container_id, []).append(key)
        else:
            stale.append(Removal((key,), None, describe_record(key, value)))
    removals = [Removal(tuple(keys), known[container_id], "key changed"
                        if isinstance(wanted.get(container_id), Entry)
                        else removal_reason(container_id in running))
                for container_id, keys in gone.items()]
    held = frozenset(cid for cid, want in wanted.items() if want is UNKNOWN)
    return Plan(tuple(removals + stale), tuple(registrations), tuple(untouched), held)


# ---------------------------------------------------------------------------------------------
# 5. Scheduling: backoff, timers, and the reconciler's work queue
# ---------------------------------------------------------------------------------------------

class RetrySchedule:
    """Exponential backoff with full jitter, from the `backoff` library's generators.

    The waiting itself is done by the caller on a stop event, so a shutdown never waits out a
    backoff delay.
    """

    def __init__(self, first: float = 0.5, cap: float = 10.0,
                 jitter: Callable[[float], float] | None = backoff.full_jitter):
        self._first, self._cap, self._jitter = first, cap, jitter
        self.failures = 0
        self._delays = None
        self.reset()

    def reset(self) -> None:
        self.failures = 0
        self._delays = backoff.expo(base=2, factor=self._first, max_value=self._cap)
        next(self._delays)  # advance past the generator's priming yield

    def next_delay(self) -> float:
        self.failures += 1
        delay = next(self._delays)
        return self._jitter(delay) if self._jitter else delay


class Timer:
    """A repeating deadline on the monotonic clock."""

    def __init__(self, interval: float, due_now: bool = True):
        self.interval = interval
        self._due = time.monotonic() if due_now else time.monotonic() + interval

    def due(self) -> bool:
        return time.monotonic() >= self._due

    def restart(self) -> None:
        self._due = time.monotonic() + self.interval

    def expire(self) -> None:
        self._due = time.monotonic()

    @property
    def due_at(self) -> float:
        return self._due

    def remaining(self) -> float:
        return max(0.0, self._due - time.monotonic())


class Refusal(NamedTuple):
    schedule: RetrySchedule
    due: float  # time.monotonic() of the next attempt
    reason: str
    armed: bool = False  # `due` was set when this attempt was taken: a new refusal keeps it


REFUSED_RETRY_CAP = 300.0  # seconds: a refused record is retried at least this often
MAX_WAIT = 3600.0  # seconds: no wait is longer (every wait can take it, whatever the settings)


class WorkQueue:
    """What the reconciler has to do, handed out in coalesced batches (client-go's rate-limiting
    work queue is the pattern): the containers to look at (one entry each, the latest event's
    word on whether it stopped), the reasons for a full reconcile (an ordered set), the periodic
    resync, and the refusal schedule (a container whose record etcd refused comes back alone,
    with a backoff of its own). Thread-safe: the event thread adds, the reconciler takes.

    Work waits while the queue is paused (Docker's event stream is down: without Docker nobody
    can tell what runs), and waking the taker is the queue's business alone.
    """

    MAX_DIRTY = 10_000  # beyond this, one full reconcile is cheaper than tracking each container

    def __init__(self, resync: float, stop: threading.Event):
        self.stop = stop
        self._cond = threading.Condition()
        self._dirty: dict[str, bool] = {}  # container id -> its latest event said it stopped
        self._full: dict[str, None] = {}
        self._paused = True
        self._resync = Timer(resync, due_now=False)
        self._refused: dict[str, Refusal] = {}
        # containers whose latest event said they stopped, while Docker's list may still show them
        # running (it lags behind the event by the teardown): the list is not trusted for them
        self._stopped_lately: set[str] = set()
        # containers known to run (their latest event was a start, or the list shows them) ->
        # since when: network events matter only to these
        self._running: dict[str, float] = {}

    # -- adding ----------------------------------------------------------------------------------

    def add(self, container_id: str, stopped: bool | None = False) -> None:
        """A container to look at; `stopped` when its latest event says it is no longer running,
        None when the event says nothing of that (a network change).

        A network change matters only to a container known to run: `docker run` connects the
        container's networks before it starts it, and `docker stop` disconnects them after it died,
        and looking at those would only cost an inspect per start (and slow the start's record
        down) or undo what the die said.
        """
        with self._cond:
            if stopped is None:
                if container_id not in self._running:
                    return
                stopped = self._dirty.get(container_id, False)
            if stopped:
                self._running.pop(container_id, None)
            elif container_id in self._running or len(self._running) < self.MAX_DIRTY:
                self._running[container_id] = time.monotonic()
            if len(self._dirty) >= self.MAX_DIRTY and container_id not in self._dirty:
                self._dirty.clear()
                self._full.setdefault(f"more than {self.MAX_DIRTY} containers pending")
            else:
                self._dirty.pop(container_id, None)  # keep the order of the latest events
                self._dirty[container_id] = stopped
            if not stopped:
                self._stopped_lately.discard(container_id)
            elif len(self._stopped_lately) < self.MAX_DIRTY:
                self._stopped_lately.add(container_id)
            self._cond.notify()

    def add_full(self, *reasons: str) -> None:
        with self._cond:
            self._full.update(dict.fromkeys(reasons))
            self._cond.notify_all()

    def requeue(self, dirty: Mapping[str, bool]) -> None:
        """Containers whose work failed: pending again, unless a newer event knows better."""
        with self._cond:
            for container_id, stopped in dirty.items():
                self._dirty.setdefault(container_id, stopped)

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self, reason: str) -> None:
        """Work is handed out again, beginning with a full reconcile for `reason`."""
        with self._cond:
            self._paused = False
            self._full.setdefault(reason)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- taking ----------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._paused

    def pending(self) -> int:
        with self._cond:
            return len(self._dirty)

    def dirty(self) -> dict[str, bool]:
        """The containers pending (id -> stopped), in the order of their latest events."""
        with self._cond:
            return dict(self._dirty)

    def take(self) -> tuple[list[str] | None, dict[str, bool]]:
        """(reasons for a full reconcile, or None; the containers to look at): nothing while
        paused. A refused container whose turn has come is among them, its next turn set now."""
        with self._cond:
            if self._paused:
                return None, {}
            if self._resync.due():
                self._full.setdefault("periodic resync")
            now = time.monotonic()
            for container_id, refusal in self._refused.items():
                if refusal.due <= now:  # its turn; the next one is armed now, whatever comes of it
                    self._dirty.setdefault(container_id, False)
                    self._refused[container_id] = refusal._replace(
                        due=now + refusal.schedule.next_delay(), armed=True)
            dirty, self._dirty = self._dirty, {}
            if self._full:  # it looks at every container, and at these events
                reasons, self._full = list(self._full), {}
                return reasons, dirty
            return None, dirty

    def resynced(self) -> None:
        """A full reconcile succeeded: the next periodic one is a whole interval away."""
        with self._cond:
            self._resync.restart()

    def wait(self) -> None:
        """Until there is work, the next resync or refusal is due, or the queue is woken."""
        with self._cond:
            if self.stop.is_set() or (not self._paused and (self._dirty or self._full)):
                return
            deadlines = [MAX_WAIT]
            if not self._paused:
                deadlines.append(self._resync.remaining())
            if not self._paused and self._refused:
                now = time.monotonic()
                deadlines.append(max(0.0, min(r.due for r in self._refused.values()) - now))
            self._cond.wait(min(deadlines))

    # -- what Docker's list says -------------------------------------------------------------

    def stopped_lately(self) -> set[str]:
        with self._cond:
            return set(self._stopped_lately)

    def listed(self, listed: Iterable[str], lately: set[str], since: float) -> None:
        """Docker's container list, asked at `since`, shows `listed` running: it has caught up
        with the events of those stopped lately that it no longer shows, and a container it
        does not show that was known to run before `since` stopped unseen, or is gone."""
        listed = set(listed)
        with self._cond:
            self._stopped_lately &= listed | (self._stopped_lately - lately)
            for container_id in listed - lately:
                self._running.setdefault(container_id, since)
            for container_id, seen in list(self._running.items()):
                if container_id not in listed and seen < since:
                    del self._running[container_id]

    # -- the refusal schedule ----------------------------------------------------------------

    def refused(self, container_id: str, reason: str) -> tuple[float, bool]:
        """etcd refused this container's record: (seconds to its next attempt, whether the
        reason is new). An attempt taken from the queue keeps the turn set when it was taken."""
        with self._cond:
            previous = self._refused.get(container_id)
            schedule = previous.schedule if previous else RetrySchedule(cap=REFUSED_RETRY_CAP)
            armed = previous is not None and previous.armed  # the next attempt is set already
            due = previous.due if armed else time.monotonic() + schedule.next_delay()
            self._refused[container_id] = Refusal(schedule, due, reason)
            self._cond.notify()
        return max(0.0, due - time.monotonic()), previous is None or previous.reason != reason

    def accepted(self, container_id: str) -> None:
        """Its records were written, or it wants none: nothing to retry for it."""
        with self._cond:
            self._refused.pop(container_id, None)

    def refusal_pending(self, container_id: str) -> bool:
        """etcd refused its record and its next turn has not come (an armed one is being tried)."""
        with self._cond:
            refusal = self._refused.get(container_id)
            return refusal is not None and not refusal.armed and refusal.due > time.monotonic()

    def refused_ids(self) -> set[str]:
        with self._cond:
            return set(self._refused)

    def refusals(self) -> dict[str, float]:
        """Refused container id -> seconds until its next attempt."""
        now = time.monotonic()
        with self._cond:
            return {cid: max(0.0, refusal.due - now) for cid, refusal in self._refused.items()}

    def forget(self, container_ids: Iterable[str]) -> None:
        """Containers that no longer run: nothing to retry for them."""
        with self._cond:
            for container_id in container_ids:
                self._refused.pop(container_id, None)


# ---------------------------------------------------------------------------------------------
# 6. Registry seam: what the reconciler writes through, this host's scope, the errors
# ---------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """An external system could not be reached; the work stays pending and is retried."""


class RegistryUnavailable(Unavailable):
    pass


class RegistryBlocked(RegistryUnavailable):
    """Something that is not this registrar's to change stands in its way: an operator must act.
    Retried with backoff like an outage, so that registration resumes once they have."""


class EngineUnavailable(Unavailable):
    pass


class ContainerUnreadable(Exception):
    """Docker answered, and could not describe this one container: it is skipped this time,
    and its records are left as they are."""


class HostLost(RegistryUnavailable):
    """A write found this host's liveness gone (a plain value in the v2 host directory's place,
    which it replaced; the v3 lease expired): said once, where it was found; everything is to be
    registered again, at once."""


class LeaseGone(RegistryUnavailable):
    """etcd no longer knows the v3 lease a request named (expired, revoked, or etcd wiped)."""

    def __init__(self, message: str, lease: int | None):
        super().__init__(message)
        self.lease = lease


class TooManyOps(RegistryBlocked):
    """etcd's --max-txn-ops is below the transaction's size."""


class AddressConflict(RegistryBlocked):
    """Another live Docker engine's registrar holds this HOST_IP: nothing is adopted, written or
    deleted until one of them is given another address, or the other one goes."""

    event = "address_conflict"

    def __init__(self, message: str, address: str, engine: str, other: str):
        super().__init__(message)
        self.fields = {"address": address, "engine": engine, "other": other}


class HeartbeatFailed(RegistryUnavailable):
    """One heartbeat attempt got no answer from `endpoint`; the next goes to `next`."""

    def __init__(self, message: str, endpoint: str, next_endpoint: str, cause: str):
        super().__init__(message)
        self.endpoint, self.next, self.cause = endpoint, next_endpoint, cause


class ApiMismatch(Exception):
    """Every etcd endpoint that answers lacks the API ETCD_API names: it never fixes itself, so
    the service exits with code 2 instead of retrying."""


class RecordRefused(Exception):
    """etcd answered, and refused this one write (too large, not permitted): the other records
    are not held back by it, and it is retried on its own."""


class Records(NamedTuple):
    """This host's keys as etcd holds them."""
    values: dict  # key -> value, every key of this host's scope (HostScope.spaces)
    detached: frozenset = frozenset()  # keys to write again even when their value is right (v3:
    # not on this host's lease, so they would outlive it)


class HostScope:
    """This host's part of the keyspace, and the one place that says what may be changed.

    The scope is a set of key spaces (`spaces`), one per index a record is kept under: today
    one, the host directory `<prefix>/<HOST_IP>`, which also holds the host's liveness (the v2
    directory's TTL, the v3 host key). A space of another index may hold `*` segments, each
    standing for any one segment: `<services-prefix>/*/<HOST_IP>` is this host's part of a
    services index, whichever service's name is in the `*`'s place, and never another host's.
    `owns` says whether a key read from etcd lies below one of the spaces; `reads` are the
    subtrees a read covers (the part of each space above its first `*`), whose keys a read
    filters through `owns`.

    Every write, refresh and delete of a registry adapter names its key through `check`, which
    passes only a key space itself (where asked for) and keys below one without an empty, `.` or
    `..` segment (etcd v2 resolves them, so `<host dir>/../x` would land outside), and returns the
    key as it goes into a URL (python-etcd puts keys into URLs as they are). The keys this service
    makes hold only key characters; a key found in etcd below the host directory may hold any (an
    operator's `foo bar`): it is escaped, so that exactly that key is deleted. On v3 (`flat`) keys
    are plain byte strings that nothing resolves: a found key needs only to lie below a space.
    """

    def __init__(self, prefix: str, host_ip: str, flat: bool = False, indexes: Iterable[str] = ()):
        self.prefix = prefix
        self.host_dir = f"{prefix}/{host_ip}"
        self.spaces: tuple[str, ...] = (self.host_dir, *indexes)  # the host index first
        self.flat = flat
        for space in self.spaces:
            if not space.startswith("/") or not all(part == "*" or self._clean(part)
                                                    for part in space[1:].split("/")):
                raise OutsideScope(f"{space!r} is not a clean etcd path")

    @staticmethod
    def _clean(path: str, found: bool = False) -> bool:
        """No empty, `.` or `..` segment; only key characters unless `found`."""
        return all(segment not in ("", ".", "..") and (found or KEY_SEGMENT_RE.fullmatch(segment))
                   for segment in path.split("/"))

    def _space_of(self, key: str, found: bool = False) -> str | None:
        """The space `key` lies strictly below, as `key` spells it (its `*` segments filled in)."""
        parts = key.split("/")
        for space in self.spaces:
            pattern = space.split("/")
            if len(parts) > len(pattern) and all(
                    want == part or (want == "*" and self._clean(part, found))
                    for want, part in zip(pattern, parts)):
                return "/".join(parts[:len(pattern)])
        return None

    def owns(self, key: str) -> bool:
        """A key found in etcd lies below one of this host's spaces."""
        return self._space_of(key, found=True) is not None

    def reads(self) -> tuple[str, ...]:
        """The subtrees a read of this host's records covers, the host directory first."""
        heads = []
        for space in self.spaces:
            head = space.split("/*", 1)[0]
            if head not in heads:
                heads.append(head)
        return tuple(heads)

    def check(self, key: str, host_dir: bool = False, found: bool = False) -> str:
        """The URL form of `key` when it is this host's to change; raises OutsideScope otherwise.
        `found`: a key read from etcd below the host directory, which may hold any character."""
        if key in self.spaces and "*" not in key:
            if host_dir:
                return key
        else:
            space = self._space_of(key, found)
            if space is not None:
                if found and self.flat:
                    return key  # v3 sends keys as bytes (base64), never in a URL: any byte is fine
                if self._clean(key[len(space) + 1:], found):
                    return urllib.parse.quote(key, safe="/:@+")
        raise OutsideScope(f"refusing to change {printable(key)}: not a clean key inside "
                           f"{', '.join(space + '/' for space in self.spaces)}")

    def ancestors(self, key: str) -> list[str]:
        """Every directory above `key`, from the top: /a, /a/b, ..."""
        parts = key.split("/")[1:-1]
        return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


class OutsideScope(AssertionError):
    """A write outside this host's subtree was attempted, and refused before any request."""


Report = Callable[[str, "RecordRefused | None"], None]


class Registry:
    """The seam: the one interface the reconciler writes through, in the registry's own terms.

    - `prepare()`: this host's liveness (v2: the host directory with its TTL; v3: the lease and
      the host key) is in place before any record is written. True when it was not: whatever was
      there cannot be trusted, and a full reconcile must follow.
    - `heartbeat()`: extend the liveness by REGISTER_TTL, in one request. None, or a sentence
      saying what had happened to it (then everything is registered again).
    - `read()`: this host's records (Records).
    - `apply(deletes, puts, report, keep)`: deletes first, then puts; `report(key, refusal)` for
      every operation done, with the RecordRefused of a put etcd refused (the others go on).
      `keep`, in a full reconcile: every key that stays, so the adapter can tidy what holds none.
    - `clear()`: remove this host's keys (--deregister-on-exit).

    Both adapters check the API at the first `prepare` (ApiMismatch when no endpoint that answers
    serves it), fail over between endpoints, and write only through HostScope.check.
    """

    API = 0
    TIMEOUT = 5  # seconds for one request: a stalled etcd must not stall the service
    LIVENESS = ""  # what keeps this host's keys alive, for log lines
    REFRESHED = ""  # what the heartbeat refreshes, for log lines
    FLAT = False  # keys are plain byte strings that nothing resolves (v3), not paths (v2)

    def __init__(self, config: Config):
        self.config = config
        self.endpoints = config.etcd_endpoints
        self.scope = HostScope(config.prefix, config.host_ip, flat=self.FLAT)
        self.host_dir = self.scope.host_dir  # v2: the host directory; v3: the host key
        self.ttl = config.ttl
        self._current = 0
        self._lock = threading.Lock()
        self._api_checked = False
        self.closed = False
        self._answered_at: float | None = None  # monotonic time of etcd's last good answer
        self._answered_lock = threading.Lock()  # its own: _answered is called under _lock too
        self._client = None  # the current endpoint's client (_connection)
        self._ready = False  # the liveness was found in place since the last failure
        self.engine_id: str | None = None  # the Docker engine this registrar speaks for
        self.granted_new = False  # the last prepare made the liveness anew: its whole TTL ahead
        self._lost: str | None = None  # why the liveness was found lost: said when it is made anew
        # The heartbeat's own endpoint and client: it fails over on its own, within its interval,
        # without waiting for the reconciler's requests (heartbeat thread only)
        self._beat_index = 0
        self._beat_client = None
        self._side: requests.Session | None = None  # for a diagnosis after a failure
        self._started: str | None = None  # when this registrar took the address (owner record)

    # -- the client of the current endpoint ----------------------------------------------------

    def _connection(self):
        """One client per endpoint, made on first use and again after a connection failure:
        python-etcd gives up on a server list for good once every member failed, and this service
        must never give up."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client(self.endpoint)
            return self._client

    def _make_client(self, endpoint: Endpoint):
        raise NotImplementedError

    def _failed(self, client) -> None:
        """A request through `client` failed: the next goes to the next endpoint, and the
        liveness is looked at again before any write."""
        with self._lock:
            if self._client is client:  # the first thread to see the failure moves on
                self._client = None
                self._current += 1
            self._ready = False

    def _answered(self) -> None:
        with self._answered_lock:
            self._answered_at = time.monotonic()

    @property
    def answered_at(self) -> float | None:
        """When etcd last answered (monotonic time; /healthz)."""
        with self._answered_lock:
            return self._answered_at

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._current % len(self.endpoints)]

    def _password(self) -> str | None:
        """Read at each authentication, so that a rotated secret file is picked up."""
        if self.config.etcd_password_file:
            try:
                return read_password_file(self.config.etcd_password_file)
            except ValueError as exc:
                raise RegistryBlocked(f"ETCD_PASSWORD_FILE={self.config.etcd_password_file!r} {exc}; "
                                      "expected the etcd user's password in it") from None
        return self.config.etcd_password

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE or a proxy must not override these settings
        if self.config.etcd_ca_file:
            session.verify = self.config.etcd_ca_file
        if self.config.etcd_cert_file:
            session.cert = (self.config.etcd_cert_file, self.config.etcd_key_file)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=16, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    # -- which API the cluster serves --------------------------------------------------------

    def prepare(self) -> bool:
        if not self._api_checked:
            self._check_api()
        return self._prepare()

    def _check_api(self) -> None:
        """Every endpoint is asked once; the first that serves this API is used. Exits (raises
        ApiMismatch) only when every endpoint that answers lacks it: --enable-v2 is set per
        member. Endpoints that are down are waited for, as always."""
        session = self._session()
        down, lacking = [], []
        try:
            for index, endpoint in enumerate(self.endpoints):
                verdict, detail = self._probe(session, endpoint)
                if verdict == "serves":
                    self._accept(endpoint, detail)
                    self._answered()
                    self._current = self._beat_index = index
                    self._api_checked = True
                    for url, cause in down:
                        log_event(logging.WARNING, f"etcd at {url} failed: {cause}; using {endpoint.url}",
                                  event="endpoint_down", endpoint=url)
                    return
                (lacking if verdict == "lacks" else down).append((endpoint.url, detail))
        finally:
            session.close()
        if lacking and not any(version[:1].isdigit() for _, version in lacking):
            where = ", ".join(url for url, _ in lacking)
            raise ApiMismatch(f"ETCD_ENDPOINT: {where} does not answer like etcd (its /version names no "
                              "etcd server); check the host and port of ETCD_ENDPOINT")
        if lacking:
            raise ApiMismatch(self._mismatch(lacking))
        raise RegistryUnavailable("; ".join(f"etcd at {url} failed: {cause}" for url, cause in down))

    def _probe(self, session: requests.Session, endpoint: Endpoint) -> tuple[str, str]:
        """("serves" | "lacks", etcd's version) or ("down", why)."""
        try:
            answer = session.get(f"{endpoint.url}/version", timeout=self.TIMEOUT)
            if answer.status_code >= 500:  # a proxy in front of an etcd that is not up, say
                return "down", f"HTTP {answer.status_code} {printable(answer.text, 100)}"
            try:
                version = str(answer.json()["etcdserver"])
            except (ValueError, TypeError, KeyError, AttributeError):
                return "lacks", "not etcd"  # something else listens there: it never fixes itself
            answer = self._probe_api(session, endpoint)
        except (requests.RequestException, OSError) as exc:
            return "down", self._failure(endpoint.url, exc)
        if answer.status_code == 404:
            return "lacks", version
        if answer.status_code >= 500:
            return "down", f"HTTP {answer.status_code} {printable(answer.text, 100)}"
        return "serves", version

    def _probe_api(self, session: requests.Session, endpoint: Endpoint) -> requests.Response:
        raise NotImplementedError

    def _mismatch(self, lacking: list[tuple[str, str]]) -> str:
        raise NotImplementedError

    def _accept(self, endpoint: Endpoint, version: str) -> None:
        """Raises ApiMismatch when this etcd serves the API but cannot serve this configuration."""

    def check_api(self) -> None:
        """The API check alone (the first prepare does it too): before Docker is asked anything,
        so that a configuration that can never work exits at once."""
        if not self._api_checked:
            self._check_api()

    def _failure(self, url: str, exc: BaseException) -> str:
        """Why a request to `url` failed; after a timeout, whether the member has a leader."""
        cause = describe(exc)
        return cause + self._leaderless(url) if "timed out" in cause else cause

    def _leaderless(self, url: str) -> str:
        """Said after a request to `url` timed out: a member that lost its leader holds every write
        and quorum read until an election ends, and answers only its status."""
        try:
            if self._side is None:
                self._side = self._session()
            answer = self._side.post(f"{url}/v3/maintenance/status", json={}, timeout=1)
            if answer.status_code == 200 and str(answer.json().get("leader") or "0") == "0":
                return " (the member has no leader: its cluster has lost its quorum or is electing one)"
        except Exception:  # a diagnosis only: whatever it meets, the failure is said as it was
            pass
        return ""

    # -- the heartbeat's own endpoint ---------------------------------------------------------

    @property
    def beat_endpoint(self) -> Endpoint:
        return self.endpoints[self._beat_index % len(self.endpoints)]

    def _beat_failed(self, cause: str) -> HeartbeatFailed:
        """The heartbeat moves to the next endpoint at once."""
        failed = self.beat_endpoint.url
        self._beat_index += 1
        self._beat_client = None
        return HeartbeatFailed(f"etcd at {failed} failed: {cause}", failed, self.beat_endpoint.url, cause)

    def liveness(self) -> str:
        """What keeps this host's keys alive, named for a log line."""
        return f"{self.LIVENESS} {self.host_dir}"

    def made_anew(self) -> str:
        """Why a full reconcile follows a prepare that had to make the liveness anew."""
        raise NotImplementedError

    def _owner_text(self) -> str:
        """What this registrar writes where the owner of the address is recorded (v3: the host
        key; v2: the hidden _registrar key)."""
        return json.dumps({"registrar": VERSION, "started": self._started, "engine": self.engine_id},
                          separators=(",", ":"))

    def _conflict(self, other: str, where: str) -> AddressConflict:
        ip, other = self.config.host_ip, plain_word(other)
        return AddressConflict(
            f"HOST_IP {ip} is claimed by two Docker engines: this one ({self.engine_id}) and {other}; "
            f"its registrar holds {where}; registering nothing and touching none of its keys until "
            "one of the hosts is given another HOST_IP or the other registrar stops and its "
            f"{self.LIVENESS} expires (see the README, \"Two engines, one HOST_IP\")",
            ip, self.engine_id or "", other)

    # -- the seam: each adapter has these ----------------------------------------------------

    def _prepare(self) -> bool:
        raise NotImplementedError

    def heartbeat(self, timeout: float) -> str | None:
        """One request, on the heartbeat's own endpoint, that waits at most `timeout` seconds:
        None when the liveness lives (or there is none yet), a sentence when it was found lost
        (the next prepare makes it anew), HeartbeatFailed when the endpoint did not answer."""
        raise NotImplementedError

    def read(self) -> Records:
        raise NotImplementedError

    def apply(self, deletes: list[str], puts: list[tuple[str, str]], report: Report,
              keep: set | None = None) -> None:
        raise NotImplementedError

    def clear(self) -> bool:
        """True when this host's keys were deleted; False when they were not this registrar's."""
        raise NotImplementedError


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


STARTED_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
ENGINE_RE = re.compile(r"[\x21-\x7e]{1,200}")


def _owner_json(text: object) -> dict | None:
    """{"registrar", "started", "engine"} of an owner record (v3 host key, v2 _registrar), None
    for anything else: found in etcd, it may be junk of any size, depth or type. "engine" is None
    in a record of a version from before engines were recorded."""
    if not isinstance(text, str) or len(text) > 4096:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    registrar, started, engine = value.get("registrar"), value.get("started"), value.get("engine")
    if not (isinstance(registrar, str) and isinstance(started, str) and STARTED_RE.fullmatch(started)
            and (engine is None or (isinstance(engine, str) and ENGINE_RE.fullmatch(engine)))):
        return None
    return {"registrar": plain_word(registrar, 40), "started": started, "engine": engine}


def _where(lacking: list[tuple[str, str]]) -> str:
    return ", ".join(f"{url} (etcd {version})" if version[:1].isdigit() else f"{url} ({version})"
                     for url, version in lacking)


# ---------------------------------------------------------------------------------------------
# 7. etcd v2 adapter: python-etcd, a host directory with a TTL
# ---------------------------------------------------------------------------------------------

class EtcdV2Registry(Registry):
    """etcd's v2 API through python-etcd: a host directory with a TTL, refreshed without waking
    a watcher; image directories below it, pruned when empty."""

    API = 2
    POOL = 16
    LIVENESS = "host directory"
    REFRESHED = "TTL"

    def __init__(self, config: Config, pool: ThreadPoolExecutor | None = None):
        global etcd
        import etcd  # python-etcd
        super().__init__(config)
        self._ca_file = config.etcd_ca_file
        self._cert = (config.etcd_cert_file, config.etcd_key_file) if config.etcd_cert_file else None
        self._dirs: set[str] = set()  # the directories below the host directory, as last read
        self._pool = pool  # shared with the reconciler's inspects: the service's one I/O pool
        # Who holds the address: a hidden key (v2 listings and recursive reads do not show keys
        # that start with `_`, so consumers never see it), inside the directory, so it expires
        # with it. No image key can take its name: those always start with a letter or digit.
        self.owner_key = f"{self.host_dir}/_registrar"
        self._claimed = False  # the owner key holds this registrar's record, as last seen
        self._prepared_once = False  # the directory was found or made: there is one to refresh
        # the directory's createdIndex when it was made or found: a refresh that finds another one
        # found a directory made anew meanwhile (by a child write, or by another registrar)
        self._dir_created: int | None = None

    def made_anew(self) -> str:
        return f"host directory {self.host_dir} was (re)created"

    def _accept(self, endpoint: Endpoint, version: str) -> None:
        if self.ttl and re.match(r"3\.([5-9]|[1-9][0-9])\.", version):  # said before any write
            raise self._no_directory_ttl(f"{endpoint.url} (etcd {version})")

    def _no_directory_ttl(self, where: str) -> ApiMismatch:
        """etcd 3.5's v2 API: found from its version at the API check, and, should a later 3.5 not
        say so, from its answer to a refresh. It never fixes itself."""
        return ApiMismatch(
            f"etcd at {where} cannot change a directory's TTL through its v2 API (etcd 3.5 answers "
            "\"Raft Internal Error: Not a file\", etcd-io/etcd#13589), so "
            f"{self.host_dir} could not be kept alive; set ETCD_API=3 (--etcd-api 3), or REGISTER_TTL=0 "
            "to register without a TTL")

    @staticmethod
    def _is_no_directory_ttl(payload: dict) -> bool:
        return payload.get("errorCode") == 300 and "Not a file" in str(payload.get("cause"))

    def _probe_api(self, session: requests.Session, endpoint: Endpoint) -> requests.Response:
        auth = (self.config.etcd_username, self._password()) if self.config.etcd_username else None
        return session.get(f"{endpoint.url}/v2/keys/", auth=auth, timeout=self.TIMEOUT)

    def _mismatch(self, lacking: list[tuple[str, str]]) -> str:
        return (f"ETCD_API=2 but etcd at {_where(lacking)} does not serve the v2 API (etcd 3.4 and 3.5 "
                "serve it only when started with --enable-v2=true, 3.6 and later not at all); set "
                "ETCD_API=3 (--etcd-api 3) to register with the v3 API, or enable v2 on every member")

    def _make_client(self, endpoint: Endpoint) -> etcd.Client:
        user = self.config.etcd_username
        client = etcd.Client(host=endpoint.host, port=endpoint.port, protocol=endpoint.protocol,
                             read_timeout=self.TIMEOUT, allow_reconnect=False,
                             per_host_pool_size=self.POOL, cert=self._cert, ca_cert=self._ca_file,
                             username=user, password=self._password() if user else None)
        # urllib3 would retry each request three more times on its own (4 x TIMEOUT against a
        # stalled etcd); retries are this service's, with backoff and a log line.
        client.http.connection_pool_kw["retries"] = urllib3.Retry(0)
        return client

    def _call(self, operation: Callable[[etcd.Client], object], key: str, record: bool = False,
              write: bool = False):
        """One request about `key`. etcd's refusals (HTTP 4xx) of a record write concern that
        record alone (RecordRefused); of anything else, every write here (RegistryBlocked)."""
        client = self._connection()
        try:
            result = operation(client)
            self._answered()
            return result
        except (etcd.EtcdKeyError, etcd.EtcdCompareFailed, etcd.EtcdDirNotEmpty):
            self._answered()
            raise  # the key's state, handled by the caller
        except etcd.EtcdException as exc:
            payload = exc.payload if isinstance(exc.payload, dict) else {}
            status = payload.get("status")
            if self._is_no_directory_ttl(payload):
                raise self._no_directory_ttl(client.base_uri) from exc
            if status == 401 and write and self.config.etcd_username and self._may_read(client):
                # v2 says 401 to a wrong password and to a role without write access alike: the
                # same credentials read the host directory, so they are right and the role is not
                raise RegistryBlocked(
                    f"etcd at {client.base_uri} refused to let user {self.config.etcd_username!r} write "
                    f"{printable(key)} ({describe(exc)}, HTTP 401) although it may read {self.host_dir}: "
                    f"its role needs write access to {self.scope.prefix}/ (ETCDCTL_API=2 etcdctl role "
                    f"grant ROLE -path '{self.scope.prefix}/*' -readwrite)") from exc
            if status == 401:  # v2 authentication: no user, or a wrong one
                user = self.config.etcd_username
                source = "ETCD_PASSWORD_FILE" if self.config.etcd_password_file else "ETCD_PASSWORD"
                raise RegistryBlocked(
                    f"etcd at {client.base_uri} refused user {user!r}: {describe(exc)}; check ETCD_USERNAME "
                    f"and {source}" if user else f"etcd at {client.base_uri} requires authentication "
                    f"({describe(exc)}); set ETCD_USERNAME and ETCD_PASSWORD or ETCD_PASSWORD_FILE") from exc
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                reason = f"{describe(exc)} (HTTP {status})"
                # "Invalid POST form : http: POST too large": another record may pass; a missing
                # permission (error code 110) refuses every record alike
                if record and payload.get("errorCode") != 110:
                    raise RecordRefused(f"etcd refused it: {reason}") from exc
                raise RegistryBlocked(
                    f"etcd refused a request for {printable(key)}: {reason}; an operator should check "
                    f"what etcd lets this client do under {self.scope.prefix}/ (permissions, "
                    "limits)") from exc
            self._failed(client)
            cause = self._failure(client.base_uri, exc)
            raise RegistryUnavailable(f"etcd at {client.base_uri} failed: {cause}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._failed(client)
            cause = self._failure(client.base_uri, exc)
            raise RegistryUnavailable(f"etcd at {client.base_uri} failed: {cause}") from exc

    def _may_read(self, client: etcd.Client) -> bool:
        """These credentials may read the host directory (it need not exist)."""
        try:
            client.read(self.host_dir)
        except etcd.EtcdKeyNotFound:
            return True
        except Exception:  # a diagnosis only
            return False
        return True

    def _write(self, key: str, operation: Callable[[etcd.Client, str], object], host_dir: bool = False,
               final: bool = False, found: bool = False, record: bool = False):
        """Every change to etcd goes through here: the key is checked, then the operation runs
        with exactly the key checked. Once the service is stopping only the final deregistration
        runs."""
        checked = self.scope.check(key, host_dir=host_dir, found=found)
        if self.closed and not final:
            raise RegistryUnavailable("the service is stopping")
        return self._call(lambda c: operation(c, checked), key, record=record, write=True)

    # -- the host directory ----------------------------------------------------------------

    def _prepare(self) -> bool:
        """Make sure the host directory exists, with its TTL, before any child is written.

        etcd v2 creates missing parents without a TTL, which would silently remove the safety net.
        Returns True when the directory was missing or had lost its TTL: whatever was under it
        cannot be trusted, and a full reconcile must follow.
        """
        if self._ready:
            return False
        self._check_owner(self._owner_node())  # before anything is written
        repaired = self._ensure_ttl_dir() if self.ttl else self._ensure_no_ttl()
        if self.ttl:
            self._claim()
        with self._lock:
            lost, self._lost = self._lost, None
            self._ready = True
        if lost and repaired:
            log_event(logging.WARNING, f"host directory {self.host_dir} {lost}; re-registering everything",
                      event="host_dir_lost")
        self.granted_new, self._prepared_once = repaired, True
        return repaired

    # -- who holds the address ------------------------------------------------------------

    def _owner_node(self):
        """The owner key's node, None when there is none (nor a directory)."""
        try:
            return self._call(lambda c: c.read(self.owner_key), self.owner_key)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir, etcd.EtcdNotFile):
            return None

    def _owner_record(self, node) -> dict | None:
        value = _owner_json(node.value)
        return value if value is not None and value["engine"] is not None else None

    def _check_owner(self, node) -> dict | None:
        """This engine's owner record (None when there is no registrar's record there); raises
        AddressConflict when the owner key names another engine: it lives as long as the
        directory around it, which that engine's registrar keeps alive."""
        record = self._owner_record(node) if node is not None and not node.dir else None
        if record is None:
            return None
        if record["engine"] != self.engine_id:
            with self._lock:  # not this registrar's to keep alive any more
                self._claimed, self._prepared_once, self._ready = False, False, False
            raise self._conflict(record["engine"], self.owner_key)
        self._started = self._started or record["started"]
        return record

    def _claim(self) -> None:
        """The owner key holds this registrar's record, written only where there was none (or no
        registrar's): of two registrars that claim one address at once, one wins."""
        for _ in range(3):
            node = self._owner_node()
            if self._check_owner(node) is not None:
                self._claimed = True  # this engine's (a restarted registrar)
                return
            self._started = self._started or _now()
            value = self._owner_text()
            try:
                if node is None:
                    self._write(self.owner_key, lambda c, k, v=value: c.write(k, v, prevExist=False),
                                found=True)
                elif node.dir:  # a directory in its place: below this host's directory, its own
                    self.delete_tree(self.owner_key)
                    continue
                else:  # something else in its place: replaced, if it is still there
                    self._write(self.owner_key, lambda c, k, v=value, old=node.modifiedIndex: c.write(
                        k, v, prevIndex=old), found=True)
            except (etcd.EtcdAlreadyExist, etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
                continue
            self._claimed = True
            return
        raise RegistryUnavailable(f"etcd: {self.owner_key} kept changing under this registrar")

    def _ensure_ttl_dir(self) -> bool:
        for _ in range(3):  # the directory may expire, or an operator act, between two requests
            try:
                made = self._write(self.host_dir, lambda c, k: c.write(k, None, dir=True, ttl=self.ttl,
                                                                       prevExist=False), host_dir=True)
                self._dir_created = getattr(made, "createdIndex", None)
                return True
            except etcd.EtcdAlreadyExist:
                pass
            except etcd.EtcdNotDir:  # a plain value above it: not ours to delete
                ancestor = self._plain_ancestor(self.host_dir)
                if ancestor:
                    raise self._blocked(ancestor) from None
                continue
            try:
                node = self._call(lambda c: c.read(self.host_dir), self.host_dir)
                if not node.dir:
                    self._replace_plain_host_value()
                    continue
                self._dir_created = getattr(node, "createdIndex", None)
                if node.ttl is None:  # re-created by a child write, or left by a run with TTL 0
                    self._write(self.host_dir, lambda c, k: c.write(k, None, dir=True, ttl=self.ttl,
                                                                    prevExist=True), host_dir=True)
                    return True
                return False
            except (etcd.EtcdKeyNotFound, etcd.EtcdNotFile, etcd.EtcdNotDir):
                continue
        raise RegistryUnavailable(f"etcd: could not create {self.host_dir}: it kept changing under it")

    def _ensure_no_ttl(self) -> bool:
        """REGISTER_TTL=0: the directory comes with the first record and goes with the last; a TTL
        left by an earlier run with one must not expire the records now."""
        try:
            node = self._call(lambda c: c.read(self.host_dir), self.host_dir)
            if not node.dir:
                self._replace_plain_host_value()
                return True
            if node.ttl is not None:
                self._write(self.host_dir, lambda c, k: c.write(k, None, dir=True, prevExist=True),
                            host_dir=True)
        except etcd.EtcdNotDir:
            ancestor = self._plain_ancestor(self.host_dir)
            if ancestor:
                raise self._blocked(ancestor) from None
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
            pass  # gone meanwhile: the first record creates it, without a TTL
        return False

    def _replace_plain_host_value(self, say: bool = True) -> None:
        """A plain value where this host's directory belongs: the key is this host's own."""
        with contextlib.suppress(etcd.EtcdKeyNotFound):
            self._write(self.host_dir, lambda c, k: c.delete(k), host_dir=True)
        self._ready = False
        if say:
            log_event(logging.WARNING, f"replaced the plain value at {self.host_dir}, where this host's "
                      "directory belongs; re-registering everything", event="host_value_replaced",
                      key=self.host_dir)

    def _plain_ancestor(self, key: str) -> str | None:
        """The directory above `key` that holds a plain value instead, if any (etcd's "not a
        directory" says only that one does)."""
        for ancestor in self.scope.ancestors(key):
            try:
                node = self._call(lambda c, a=ancestor: c.read(a), ancestor)
            except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir, etcd.EtcdNotFile):
                return None
            if not node.dir:
                return ancestor
        return None

    def _blocked(self, ancestor: str) -> RegistryBlocked:
        """A plain value at `ancestor`, at or above the prefix: an operator's to remove."""
        return RegistryBlocked(
            f"etcd: {ancestor} holds a plain value, so nothing can be registered under "
            f"{self.host_dir}/; it is not this registrar's to delete: an operator should remove it "
            f"(etcdctl rm {ancestor}) or choose another REGISTER_PREFIX")

    def heartbeat(self, timeout: float) -> str | None:
        """Extend the host directory's TTL with one write that wakes no watcher, through the
        heartbeat's own client.

        None when it was there; what had happened to it when it was not: gone (expired or wiped),
        its TTL lost (re-created by a child write), or replaced by a plain value (which etcd
        refreshes like a directory). The next prepare makes it anew and says so."""
        if not self.ttl or not self._prepared_once:
            return None
        key = self.scope.check(self.host_dir, host_dir=True)
        if self._beat_client is None:
            self._beat_client = self._make_client(self.beat_endpoint)
        try:
            result = self._refresh_request(self._beat_client, key, timeout)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir, etcd.EtcdNotFile):
            self._answered()
            return self._found_lost()
        except etcd.EtcdException as exc:
            payload = exc.payload if isinstance(exc.payload, dict) else {}
            if self._is_no_directory_ttl(payload):
                raise self._no_directory_ttl(self._beat_client.base_uri) from exc
            raise self._beat_failed(describe(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._beat_failed(describe(exc)) from exc
        self._answered()
        previous = getattr(result, "_prev_node", None)
        if previous is not None and not previous.dir:
            with self._lock:  # prepare replaces it, and says so
                self._ready = False
            return f"host directory {self.host_dir} had been replaced by a plain value"
        if previous is None or previous.ttl is None:
            return self._found_lost()
        if self._dir_created is not None and getattr(previous, "createdIndex", None) != self._dir_created:
            return self._found_lost()  # made anew meanwhile: whose it is now is looked at again
        return None

    def _found_lost(self) -> str:
        with self._lock:
            self._ready, self._lost, self._claimed = False, "had expired or lost its TTL", False
        return f"host directory {self.host_dir} had expired or lost its TTL"

    def _refresh_request(self, client: etcd.Client, key: str, timeout: float):
        """Client.write's PUT of `dir=true&ttl=…&refresh=true&prevExist=true`, waiting at most
        `timeout` seconds in all (write takes no timeout)."""
        params = {"dir": "true", "ttl": self.ttl, "refresh": "true", "prevExist": "true"}
        response = client.api_execute(client.key_endpoint + key, client._MPUT, params=params,
                                      timeout=urllib3.Timeout(total=timeout))
        return client._result_from_response(response)

    # -- records ----------------------------------------------------------------------------

    def read(self) -> Records:
        try:
            top = self._call(lambda c: c.read(self.host_dir, recursive=True), self.host_dir)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir):
            self._dirs, self._claimed = set(), False
            if self.ttl:  # gone: made anew, with its TTL, before anything is written below it
                with self._lock:
                    self._ready = False
                raise HostLost(f"host directory {self.host_dir} was gone") from None
            return Records({})
        if not top.dir:  # a plain value in the directory's place: prepare() replaces it
            with self._lock:
                self._ready = False
            self._dirs, self._claimed = set(), False
            return Records({})
        # hidden: the recursive read does not show it
        self._claimed = self._check_owner(self._owner_node()) is not None
        dirs: set[str] = set()
        leaves = self._leaves(top, self.host_dir, dirs)
        for head in self.scope.reads()[1:]:  # another index's key space: plain directories
            with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotDir):
                top = self._call(lambda c, k=head: c.read(k, recursive=True), head)
                below: set[str] = set()  # of this host and of others: only this host's are kept
                leaves.update((key, value) for key, value in self._leaves(top, head, below).items()
                              if self.scope.owns(key))
                dirs.update(key for key in below if self.scope.owns(key))
        self._dirs = dirs
        return Records(leaves)

    @staticmethod
    def _leaves(top, space: str, dirs: set[str]) -> dict[str, str]:
        """The values below `space` of a recursive read; its directories are added to `dirs`."""
        leaves = {}
        for node in top.get_subtree():
            if node.key == space:
                continue
            if node.dir:
                dirs.add(node.key)
            else:
                leaves[node.key] = node.value
        return leaves

    def apply(self, deletes: list[str], puts: list[tuple[str, str]], report: Report,
              keep: set | None = None) -> None:
        def delete(key: str) -> None:
            self.delete(key)
            report(key, None)

        def put(item: tuple[str, str]) -> None:
            try:
                self.put(*item)
            except RecordRefused as exc:
                report(item[0], exc)
                return
            report(item[0], None)

        if not self._claimed and (puts or (self.ttl and keep is not None)):
            self._claim()  # the owner key goes before any record
        self._map(delete, deletes)
        if keep is None and deletes:  # an event's removal: its image directory goes if emptied
            for directory in {key.rsplit("/", 1)[0] for key in deletes} - {self.host_dir}:
                self.prune(directory)
            self.prune_host_dir()
        self._map(put, puts)
        if keep is not None:
            self._tidy(keep)

    def _map(self, function: Callable, items: list) -> None:
        if len(items) <= 1:
            for item in items:
                function(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(8, thread_name_prefix="io")
        for _ in self._pool.map(function, items):  # raises the first failure, once all are done
            pass

    def _tidy(self, keep: set) -> None:
        """Directories holding no key that stays go: image directories left empty, and anything
        deeper than a record (which no version of this service writes)."""
        kept_dirs = {key.rsplit("/", 1)[0] for key in keep}
        doomed = self._dirs - kept_dirs - keep  # a directory at a record's key was replaced
        for directory in doomed:
            if directory.rsplit("/", 1)[0] not in doomed:  # its parent's deletion takes it along
                self.delete_tree(directory)
        if not keep:
            self.prune_host_dir()

    def put(self, key: str, value: str) -> None:
        for _ in range(3):  # what sits in the way is not a record of this service: it goes
            try:
                self._write(key, lambda c, k: c.write(k, value), record=True)
                return
            except etcd.EtcdNotFile:  # a directory at the record's key
                self.delete_tree(key)
            except etcd.EtcdNotDir:  # a plain value above the record
                ancestor = self._plain_ancestor(key)
                if ancestor == key.rsplit("/", 1)[0] and ancestor != self.host_dir:
                    self.delete(ancestor)  # in its image directory's place: this host's key
                elif ancestor == self.host_dir:
                    self._replace_plain_host_value()
                    raise HostLost(f"etcd: {self.host_dir} was a plain value") from None
                elif ancestor is not None:
                    raise self._blocked(ancestor) from None
        raise RegistryUnavailable(f"etcd: could not write {key}: the tree kept changing under it")

    def delete(self, key: str) -> None:
        # gone, or the tree around it changed: either way that value is not there any more
        with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotFile, etcd.EtcdNotDir):
            self._write(key, lambda c, k: c.delete(k), found=True)

    def delete_tree(self, key: str) -> None:
        with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotDir):
            self._write(key, lambda c, k: c.delete(k, recursive=True, dir=True), found=True)

    def prune(self, directory: str) -> None:
        """Remove a directory if it is empty; anything else is fine as it is."""
        try:
            self._write(directory, lambda c, k: c.delete(k, dir=True), host_dir=True)
        except (etcd.EtcdKeyNotFound, etcd.EtcdDirNotEmpty, etcd.EtcdNotDir, etcd.EtcdNotFile):
            pass
        except etcd.EtcdException as exc:  # e.g. "Directory not empty" reported with another code
            if "not empty" not in str(exc).lower():
                raise

    def prune_host_dir(self) -> None:
        """With REGISTER_TTL=0 an empty host directory goes (its owner key first: the next record
        claims the address again); with a TTL it stays, as a heartbeat."""
        if self.ttl:
            return
        try:
            node = self._call(lambda c: c.read(self.host_dir), self.host_dir)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir, etcd.EtcdNotFile):
            node = None
        if node is not None and node.dir and not any(child.key != self.host_dir for child in node.leaves):
            with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
                self._write(self.owner_key, lambda c, k: c.delete(k), found=True)
            self._claimed = False
            self.prune(self.host_dir)
        with self._lock:
            self._ready = False

    def clear(self) -> bool:
        """The host directory and all below it, when it is this registrar's: not when its owner key
        names another engine, nor when this registrar never held the address."""
        if not self._prepared_once and not self._claimed:
            return False
        owner = self._owner_node()
        record = self._owner_record(owner) if owner is not None and not owner.dir else None
        if record is not None and record["engine"] != self.engine_id:
            log_event(logging.WARNING, f"not deleting {self.host_dir}/ on exit: {self.owner_key} names "
                      f"another Docker engine ({printable(record['engine'], 100)}); it is left as it is",
                      event="deregister_skipped")
            return False
        with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
            self._write(self.host_dir, lambda c, k: c.delete(k, recursive=True, dir=True),
                        host_dir=True, final=True)
        return True


EtcdRegistry = EtcdV2Registry


# ---------------------------------------------------------------------------------------------
# 8. etcd v3 adapter: the HTTP gateway (etcd3gw), one lease per host, transactions
# ---------------------------------------------------------------------------------------------

# gRPC status codes, as etcd's HTTP gateway reports them in the "code" of an error body
GRPC_NOT_FOUND, GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAUTHENTICATED = 5, 7, 8, 16
GRPC_REFUSALS = {3, 6, 7, 9, 11}  # invalid argument, exists, permission, precondition, range
# what etcd says of a token it no longer takes: expired or from before a restart (simple tokens),
# or issued before a user or role changed (JWT: "revision of auth store is old" on 3.4, "revision
# in header is old" on 3.5): a new token is fetched and the request sent again
TOKEN_ERRORS = ("invalid auth token", "auth token is not provided", "invalid auth management",
                "revision of auth store is old", "revision in header is old")


class Op(NamedTuple):
    """One operation of a v3 transaction."""
    key: str
    value: str | None  # None: a delete
    size: int  # bytes it adds to the request


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def _unb64(text: str | None, errors: str = "surrogateescape") -> str:
    return base64.b64decode(text or "").decode("utf-8", errors)


def _range_end(prefix: str) -> str:
    """The end of the key range of every key that starts with `prefix` (which ends in `/`)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class EtcdV3Registry(Registry):
    """etcd's v3 API through its HTTP gateway (etcd3gw): one lease per host, to which the host key
    and every record are attached; changes in transactions of at most 128 operations.

    Only the reconciler's thread (and, at exit, the deregistration) calls it.
    """

    API = 3
    LIVENESS = "lease"
    REFRESHED = "lease"
    FLAT = True
    MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
    MAX_TXN_BYTES = 1024 * 1024  # well under etcd's default --max-request-bytes (1.5 MiB)
    OP_OVERHEAD = 32  # bytes of a put's or a delete's framing, over its key and value

    def __init__(self, config: Config):
        global etcd3gw
        import etcd3gw
        import etcd3gw.exceptions
        super().__init__(config)
        self._http = self._session()
        self._token: str | None = None  # for the current client: simple tokens are per member
        self._auth_off_said = False
        self.lease: int | None = None  # guarded by _lock: the heartbeat thread reads and drops it
        self._host_stored: str | None = None  # the host key's value as this registrar wrote it
        self._foreign_said: frozenset = frozenset()  # keys of others last said to ride on the lease
        self._beat_http = self._session()  # the heartbeat's own connections
        self.max_ops = self.MAX_TXN_OPS  # lowered when etcd's --max-txn-ops is lower
        self._repair: dict | None = None  # the host key as the last read found it, to write again

    def made_anew(self) -> str:
        return f"lease of {self.host_dir} was granted anew"

    def _probe_api(self, session: requests.Session, endpoint: Endpoint) -> requests.Response:
        return session.post(f"{endpoint.url}/v3/kv/range", json={"key": _b64("\0")},
                            timeout=self.TIMEOUT)

    def _mismatch(self, lacking: list[tuple[str, str]]) -> str:
        versions = [version for _, version in lacking if version[:1].isdigit()]
        if versions and all(version.split(".")[0] in ("0", "1", "2") for version in versions):
            return (f"ETCD_API=3 but etcd at {_where(lacking)} does not serve the v3 API (etcd 2 "
                    "speaks only v2); set ETCD_API=2 (--etcd-api 2)")
        if versions and all(re.match(r"3\.[0-3]\.", version) for version in versions):
            return (f"ETCD_API=3 but etcd at {_where(lacking)} serves the v3 API's HTTP gateway only "
                    "under /v3beta/ or /v3alpha/ (before 3.4), which this registrar does not speak; "
                    "upgrade etcd to 3.4 or later, or set ETCD_API=2 (--etcd-api 2)")
        return (f"ETCD_API=3 but etcd at {_where(lacking)} answers 404 under /v3/: its HTTP gateway, "
                "which this registrar speaks v3 through, is turned off (--enable-grpc-gateway=false); "
                "turn it on, or set ETCD_API=2 (--etcd-api 2) if the server serves v2")

    # -- requests ----------------------------------------------------------------------------

    def _make_client(self, endpoint: Endpoint) -> etcd3gw.Etcd3Client:
        self._token = None  # simple tokens are per member
        return etcd3gw.Etcd3Client(host=endpoint.host.strip("[]"), port=endpoint.port,
                                   protocol=endpoint.protocol, timeout=self.TIMEOUT, api_path="/v3/",
                                   session=self._http)

    def _post(self, path: str, body: dict, about: str, record: bool = False, final: bool = False):
        """One request to the gateway; `about` names the key (or lease) for messages. A token
        etcd no longer takes (expired, or etcd restarted) is renewed once and the request sent
        again."""
        if self.closed and not final:
            raise RegistryUnavailable("the service is stopping")
        client = self._connection()
        for attempt in (1, 2):
            headers = {"Authorization": self._authenticate(client)} if self.config.etcd_username else {}
            headers = {k: v for k, v in headers.items() if v}
            try:
                result = client.post(client.get_url(path), json=body, headers=headers)
                self._answered()
                return result
            except etcd3gw.exceptions.Etcd3Exception as exc:
                code, message = self._error(exc)
                if (code == GRPC_UNAUTHENTICATED or any(t in message for t in TOKEN_ERRORS)
                        or "user name is empty" in message):
                    if self.config.etcd_username and attempt == 1:
                        self._token = None  # expired, or etcd restarted: authenticate again
                        continue
                    raise RegistryBlocked(self._auth_problem(client, message)) from exc
                self._refusal(client, exc, code, message, about, record)
            except (requests.RequestException, OSError) as exc:
                self._failed(client)
                cause = self._failure(client.base_url, exc)
                raise RegistryUnavailable(f"etcd at {client.base_url} failed: {cause}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _error(exc: etcd3gw.exceptions.Etcd3Exception) -> tuple[int | None, str]:
        """(gRPC code, etcd's message): etcd3gw puts them only in the detail text."""
        try:
            body = json.loads(exc.detail_text or "")
            return int(body.get("code")), str(body.get("message") or body.get("error") or "")
        except (ValueError, TypeError, AttributeError):
            return None, printable(exc.detail_text or str(exc) or type(exc).__name__, 200)

    def _refusal(self, client, exc, code: int | None, message: str, about: str, record: bool):
        """Raises what an error answer means here."""
        if code == GRPC_NOT_FOUND and "lease not found" in message:
            with self._lock:
                lost, self.lease, self._ready = self.lease, None, False
                if lost:
                    self._lost = self._lost or f"lease {lost:x} of {self.host_dir} had expired or been " \
                        "revoked (etcd no longer knew it when a write named it)"
            raise LeaseGone(f"etcd at {client.base_url}: {message}", lost) from exc
        if "too many operations in txn request" in message:
            raise TooManyOps(f"etcd refused a transaction: {message}; an operator should check etcd's "
                             "--max-txn-ops") from exc
        # a request over the gRPC limit (max-request-bytes + 512 KiB) is refused with code 8
        if code in GRPC_REFUSALS or (code == GRPC_RESOURCE_EXHAUSTED and "larger than max" in message):
            reason = f"{message} (gRPC code {code})"
            # a permission refusal is no refusal of one record: every write of this user is refused
            if record and code != GRPC_PERMISSION_DENIED:
                raise RecordRefused(f"etcd refused it: {reason}") from exc
            if code == GRPC_PERMISSION_DENIED and self.config.etcd_username:
                roles = self._roles(client)
                role = roles[0] if len(roles) == 1 else "ROLE"
                named = f" ({', '.join(roles)})" if roles else ""
                fix = (f"the role of etcd user {self.config.etcd_username!r}{named} needs readwrite on "
                       f"{self.scope.prefix}/ (etcdctl role grant-permission {role} readwrite "
                       f"{self.scope.prefix}/ --prefix)")
            else:
                fix = (f"an operator should check what etcd lets this client do under {self.scope.prefix}/ "
                       "(permissions, limits)")
            raise RegistryBlocked(f"etcd refused a request for {printable(about)}: {reason}; {fix}") from exc
        self._failed(client)
        # no answer: the connection's words (and, after a timeout, whether the member has a leader)
        cause = self._failure(client.base_url, exc) if code is None else message
        raise RegistryUnavailable(f"etcd at {client.base_url} failed: {cause}") from exc

    def _roles(self, client: etcd3gw.Etcd3Client) -> list[str]:
        """The roles etcd gives this user (a user may read its own), for an error line; [] when
        etcd does not say."""
        try:
            answer = client.post(client.get_url("/auth/user/get"), json={"name": self.config.etcd_username},
                                 headers={"Authorization": self._token} if self._token else {})
            return [plain_word(role, 64) for role in answer.get("roles") or []][:5]
        except Exception:  # a diagnosis only
            return []

    def _authenticate(self, client: etcd3gw.Etcd3Client) -> str | None:
        """A token for `client` (None when etcd has authentication turned off)."""
        if self._token is not None:
            return self._token or None
        user = self.config.etcd_username
        try:
            answer = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": user, "password": self._password()})
        except etcd3gw.exceptions.Etcd3Exception as exc:
            code, message = self._error(exc)
            if "authentication is not enabled" in message:
                if not self._auth_off_said:
                    self._auth_off_said = True
                    log_event(logging.WARNING, f"etcd at {client.base_url} has authentication turned "
                              f"off: ETCD_USERNAME={user!r} is not used; registering without "
                              "authentication", event="auth_off")
                self._token = ""
                return None
            if code in GRPC_REFUSALS:
                raise RegistryBlocked(self._auth_problem(client, message)) from exc
            self._failed(client)
            cause = describe(exc) if code is None else message
            raise RegistryUnavailable(f"etcd at {client.base_url} failed: {cause}") from exc
        except (requests.RequestException, OSError) as exc:
            self._failed(client)
            raise RegistryUnavailable(f"etcd at {client.base_url} failed: {describe(exc)}") from exc
        token = answer.get("token") if isinstance(answer, dict) else None
        if not token:
            raise RegistryUnavailable(f"etcd at {client.base_url} answered without a token")
        self._token = token
        log_event(logging.DEBUG, f"authenticated to etcd at {client.base_url} as {user!r}",
                  event="authenticated")
        return token

    def _auth_problem(self, client: etcd3gw.Etcd3Client, message: str) -> str:
        user = self.config.etcd_username
        if not user:
            return (f"etcd at {client.base_url} requires authentication ({message}); set ETCD_USERNAME "
                    "and ETCD_PASSWORD or ETCD_PASSWORD_FILE")
        source = "ETCD_PASSWORD_FILE" if self.config.etcd_password_file else "ETCD_PASSWORD"
        return (f"etcd at {client.base_url} refused user {user!r}: {message}; check ETCD_USERNAME and "
                f"{source}")

    def _txn(self, ops: list[Op], record: bool = False, final: bool = False,
             compare: list[dict] | None = None) -> None:
        """One transaction; every key was checked by HostScope when its Op was made.

        Every put rides on this host's lease (with a TTL, a put with no lease would never expire:
        when the lease was just found lost, LeaseGone instead), and the whole transaction is
        guarded by the host key: it applies only while the host key holds exactly what this
        registrar wrote there, so that a registrar whose address was taken over by another engine
        writes and deletes nothing. `compare`: the host key's own put, guarded by what it held."""
        with self._lock:
            lease = self.lease
        if self.ttl and not lease and any(op.value is not None for op in ops):
            raise LeaseGone("the lease was found lost", None)
        body = []
        for op in ops:
            if op.value is None:
                body.append({"request_delete_range": {"key": _b64(op.key)}})
            else:
                put = {"key": _b64(op.key), "value": _b64(op.value)}
                if lease:
                    put["lease"] = str(lease)
                body.append({"request_put": put})
        if compare is None:
            if self._host_stored is None:
                raise HostLost(f"host key {self.host_dir} is not this registrar's yet")
            compare = [{"key": _b64(self.host_dir), "target": "VALUE", "result": "EQUAL",
                        "value": _b64(self._host_stored)}]
        answer = self._post("/kv/txn", {"compare": compare, "success": body}, ops[0].key, record=record,
                            final=final)
        if not answer.get("succeeded"):
            with self._lock:
                self._ready = False
            raise HostLost(f"host key {self.host_dir} no longer holds this registrar's record")

    def _op(self, key: str, value: str | None, found: bool = False, host_key: bool = False) -> Op:
        self.scope.check(key, host_dir=host_key, found=found)
        size = len(key.encode("utf-8", "surrogateescape")) + self.OP_OVERHEAD
        return Op(key, value, size + (len(value.encode("utf-8")) if value is not None else 0))

    def _get(self, key: str) -> dict | None:
        answer = self._post("/kv/range", {"key": _b64(key)}, key)
        kvs = answer.get("kvs") or []
        return kvs[0] if kvs else None

    # -- the lease and the host key ------------------------------------------------------------

    def liveness(self) -> str:
        with self._lock:
            lease = self.lease
        return f"lease {lease:x} of {self.host_dir}" if lease else f"the lease of {self.host_dir}"

    @staticmethod
    def _host_record(kv: dict | None) -> dict | None:
        """{"registrar", "started", "engine" (None before engines were recorded)} when the host
        key holds a registrar's record."""
        try:
            return _owner_json(_unb64(kv["value"], "strict"))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def _is_own(self, kv: dict | None) -> bool:
        """The host key holds exactly what this registrar writes there now."""
        return kv is not None and _unb64(kv.get("value")) == self._owner_text()

    def _lease_ttl(self, lease: int, final: bool = False) -> tuple[int, int, list[str]]:
        """(seconds left, TTL it was granted with, its keys); seconds left is -1 when it is gone."""
        answer = self._post("/lease/timetolive", {"ID": str(lease), "keys": True}, f"lease {lease:x}",
                            final=final)
        return (int(answer.get("TTL", -1)), int(answer.get("grantedTTL", 0)),
                [_unb64(key) for key in answer.get("keys") or []])

    def _ours(self, key: str) -> bool:
        return key == self.host_dir or self.scope.owns(key)

    def _say_foreign(self, lease: int, keys: list[str], then: str) -> list[str]:
        """Keys of others that ride on this host's lease: never deleted here, never a reason to
        drop the lease; said once for each new set of them."""
        foreign = sorted(key for key in keys if not self._ours(key))
        if foreign and frozenset(foreign) != self._foreign_said:
            shown_keys = ", ".join(printable(key, 100) for key in foreign[:10])
            more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
            log_event(logging.WARNING, f"keys that are not this host's ride on lease {lease:x} of "
                      f"{self.host_dir}: {shown_keys}{more}; they are kept as they are, never deleted "
                      f"by this registrar, and live as long as the lease: {then}",
                      event="foreign_keys_on_lease", lease=f"{lease:x}", keys=foreign[:100])
        self._foreign_said = frozenset(foreign)
        return foreign

    def _check_owner(self, kv: dict | None) -> None:
        """Raises AddressConflict when the host key says another live engine holds the address:
        its registrar's record names another engine, on a lease that lives or on none (without a
        TTL nothing tells whether it lives). A record that names no engine was written before
        engines were recorded: it is adopted as this engine's."""
        record = self._host_record(kv)
        other = record["engine"] if record else None
        if not other or other == self.engine_id:
            return
        on_lease = int(kv.get("lease", 0))
        if on_lease and self._lease_ttl(on_lease)[0] <= 0:
            return  # expired meanwhile: the address is free
        with self._lock:  # this registrar lets its own lease, if any, expire with what is on it
            self.lease, self._ready = None, False
        self._host_stored = None
        where = (f"{self.host_dir} on lease {on_lease:x}" if on_lease else
                 f"{self.host_dir} without a lease (if that engine is gone for good: etcdctl del "
                 f"{self.host_dir})")
        raise self._conflict(other, where)

    def _prepare(self) -> bool:
        """The host key is in place, on a lease that lives (adopted when a restarted registrar
        finds its own). True when anything had to be (re)made: then a full reconcile follows."""
        if self._ready:
            return False
        self._repair = None  # the host key is looked at again here
        for _ in range(3):  # the host key may change between the read and the guarded put
            try:
                return self._prepare_once()
            except _Raced:
                continue
        raise RegistryUnavailable(f"etcd: {self.host_dir} kept changing under this registrar")

    def _prepare_once(self) -> bool:
        kv = self._get(self.host_dir)
        self._check_owner(kv)
        record = self._host_record(kv)
        on_lease = int(kv.get("lease", 0)) if kv else 0
        if not self.ttl:
            with self._lock:
                self.lease = None
            self._started = record["started"] if record else (self._started or _now())
            intact = not on_lease and self._is_own(kv)
            if not intact:
                self._put_host_key(kv)
            self._host_stored = self._owner_text()
            self._ready, self.granted_new = True, False
            return not intact
        with self._lock:
            own = self.lease  # granted or adopted by this process: kept whatever rides on it
        candidate = own or on_lease
        left, granted, keys = self._lease_ttl(candidate) if candidate else (-1, 0, [])
        # another registrar's lease is never adopted: the host key must hold a registrar's record
        # of this engine (or of none, from before engines were recorded) granted with this TTL
        adoptable = left > 0 and (candidate == own or (granted == self.ttl and record is not None))
        if adoptable:
            self._say_foreign(candidate, keys, "on exit this registrar deletes its own keys one by one "
                              "and leaves the lease to expire")
            with self._lock:  # alive after all: whatever was taken for its loss was not one
                self.lease, self._lost = candidate, None
            if record is not None and on_lease == candidate:
                self._started = record["started"]
            self._started = self._started or _now()
            intact = on_lease == candidate and self._is_own(kv)
            if not intact:
                self._put_host_key(kv)
            self._host_stored = self._owner_text()
            if own is None:
                log_event(logging.INFO, f"adopted lease {candidate:x} of {self.host_dir} (granted "
                          f"{self._started}, {left} s left of {granted} s): records that are right "
                          "stay as they are", event="lease_adopted", lease=f"{candidate:x}")
            self._ready, self.granted_new = True, False
            return not intact
        if candidate and own is None and left > 0:
            why = (f"it was granted for {granted} s, not REGISTER_TTL={self.ttl}" if granted != self.ttl
                   else "the host key holds no registrar's record")
            log_event(logging.INFO, f"not adopting lease {candidate:x} of {self.host_dir}: {why}",
                      event="lease_replaced")
        lost = self._lost or (f"lease {own:x} of {self.host_dir} had expired or been revoked (etcd said "
                              "so when it answered again)" if own else None)
        answer = self._post("/lease/grant", {"TTL": self.ttl, "ID": 0}, self.host_dir)
        new = int(answer["ID"])
        with self._lock:
            self.lease, self._lost = new, None
        self._started = _now()
        self._put_host_key(kv)
        self._host_stored = self._owner_text()
        given = int(answer.get("TTL", self.ttl))
        note = "" if given == self.ttl else (f"; etcd made it {given} s (its minimum lease TTL): a "
                                             "restart writes everything again")
        if lost:
            log_event(logging.WARNING, f"{lost}; re-registering everything on new lease {new:x}{note}",
                      event="host_dir_lost", lease=f"{new:x}")
        else:
            log_event(logging.INFO if given == self.ttl else logging.WARNING,
                      f"granted lease {new:x} ({self.ttl} s) for {self.host_dir}{note}; every record "
                      "is written on it", event="lease_granted", lease=f"{new:x}")
        self._ready, self.granted_new = True, True
        return True

    def heartbeat(self, timeout: float) -> str | None:
        """One keepalive of the lease: every key on it lives another REGISTER_TTL seconds. It
        needs no authentication (etcd 3.4 and 3.5 renew a lease for any client), so it costs no
        token and waits for no other request."""
        with self._lock:
            lease = self.lease
        if lease is None:
            return None
        endpoint = self.beat_endpoint
        try:
            answer = self._beat_http.post(f"{endpoint.url}/v3/lease/keepalive", json={"ID": str(lease)},
                                          timeout=(min(1.0, timeout), timeout))
            body = answer.json() if answer.content else {}
        except (requests.RequestException, OSError, ValueError) as exc:
            raise self._beat_failed(describe(exc)) from exc
        body = body if isinstance(body, dict) else {}
        result = body.get("result")
        if answer.status_code == 200 and isinstance(result, dict):
            try:
                left = int(result.get("TTL", 0))
            except (TypeError, ValueError):
                raise self._beat_failed(f"an answer without a TTL: {printable(answer.text, 100)}") from None
            self._answered()
            if left > 0:
                return None
            why = "its keepalive was answered with TTL 0"
        elif answer.status_code == 200:  # no answer of etcd's: nothing is known of the lease
            raise self._beat_failed(f"an answer that is not etcd's: {printable(answer.text, 100)}")
        elif "lease not found" in str(body.get("message")):
            self._answered()
            why = "its keepalive was answered \"lease not found\""
        else:
            said = printable(body.get("message") or answer.text, 100)
            raise self._beat_failed(f"HTTP {answer.status_code} {said}")
        lost = f"lease {lease:x} of {self.host_dir} had expired or been revoked ({why})"
        with self._lock:
            if self.lease == lease:
                self.lease, self._ready, self._lost = None, False, lost
        return lost

    # -- records ---------------------------------------------------------------------------------

    def read(self) -> Records:
        """The records and the host key, in one request per key space, writing nothing: a host
        key that an operator deleted, or that is not on the lease, is put back by the next
        `apply` (the keepalive cannot tell); one that names another live engine stops everything
        (AddressConflict). A reader that holds no lease (a dry run) compares the records with the
        host key's lease."""
        host, kvs = None, []
        for head in self.scope.reads():
            answer = self._post("/kv/range", {"key": _b64(head), "range_end": _b64(_range_end(head + "/"))},
                                head)
            for kv in answer.get("kvs") or []:
                key = _unb64(kv.get("key"))
                if key == self.host_dir:
                    host = kv
                elif self.scope.owns(key):  # not <prefix>/10.0.0.1-x, which sorts in between
                    kvs.append((key, kv))
        self._check_owner(host)
        with self._lock:
            lease = self.lease
        if lease is None and self.ttl and host is not None:
            lease = int(host.get("lease", 0)) or None
        values = {key: _unb64(kv.get("value"), "replace") for key, kv in kvs}
        detached = {key for key, kv in kvs if int(kv.get("lease", 0)) != (lease or 0)}
        intact = host is not None and int(host.get("lease", 0)) == (lease or 0) and self._is_own(host)
        self._repair = None if intact else (host or {})
        return Records(values, frozenset(detached))

    def _repair_host_key(self) -> None:
        """The host key as the last read found it missing or not this registrar's: written again,
        only if it still holds what was found."""
        found, self._repair = self._repair, None
        try:
            self._put_host_key(found or None)
        except _Raced:
            with self._lock:
                self._ready = False
            raise HostLost(f"host key {self.host_dir} changed under this registrar") from None
        self._host_stored = self._owner_text()
        log_event(logging.WARNING, f"host key {self.host_dir} was missing or not this registrar's; "
                  "written again", event="host_key_repaired", key=self.host_dir)

    def _put_host_key(self, found: dict | None) -> None:
        """The host key, on the lease, only if it still holds what was `found` there (etcd's
        mod_revision: 0 for a key that is not there); _Raced when it changed meanwhile."""
        compare = [{"key": _b64(self.host_dir), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(int(found.get("mod_revision", 0)) if found else 0)}]
        try:
            self._txn([self._op(self.host_dir, self._owner_text(), host_key=True)], compare=compare)
        except LeaseGone as exc:
            raise self._lease_lost(exc.lease) from None
        except HostLost:
            raise _Raced() from None

    def _lease_lost(self, lease: int | None) -> HostLost:
        """The reconciler registers everything again, on a new lease; the next prepare says so."""
        with self._lock:
            self._ready = False
            if lease and not self._lost:
                self._lost = (f"lease {lease:x} of {self.host_dir} had expired or been revoked (etcd no "
                              "longer knew it when a write named it)")
        return HostLost(f"lease {lease or 0:x} was gone")

    def apply(self, deletes: list[str], puts: list[tuple[str, str]], report: Report,
              keep: set | None = None) -> None:
        """Deletes first, in transactions of their own, so that a refused put never holds one
        back; then puts. A refused transaction of puts is split in halves, down to the one
        record etcd refuses, which alone is reported refused. A host key the last read found
        wanting is written again first: every other write is guarded by it."""
        if self._repair is not None:
            self._repair_host_key()
        for batch in self._batches([self._op(key, None, found=True) for key in deletes]):
            self._commit(batch, report, record=False)
        try:
            for batch in self._batches([self._op(key, value) for key, value in puts]):
                self._commit(batch, report)
        except LeaseGone as exc:
            raise self._lease_lost(exc.lease) from None

    def _commit(self, batch: list[Op], report: Report, record: bool = True) -> None:
        try:
            self._txn(batch, record=record)
        except TooManyOps:  # an etcd with a lower --max-txn-ops: smaller transactions from now on
            if len(batch) == 1:
                raise
            if len(batch) // 2 < self.max_ops:  # said once per step down
                self.max_ops = len(batch) // 2
                log_event(logging.WARNING, f"etcd takes fewer than {len(batch)} operations per "
                          f"transaction (--max-txn-ops): retrying in transactions of {self.max_ops}",
                          event="txn_limit", max_ops=self.max_ops)
            for part in self._batches(batch):
                self._commit(part, report, record)
            return
        except RecordRefused as exc:
            if len(batch) == 1:
                report(batch[0].key, exc)
                return
            half = len(batch) // 2
            self._commit(batch[:half], report, record)
            self._commit(batch[half:], report, record)
            return
        for op in batch:
            report(op.key, None)

    def _batches(self, ops: list[Op]) -> Iterable[list[Op]]:
        batch, size = [], 0
        for op in ops:
            if batch and (len(batch) >= self.max_ops or size + op.size > self.MAX_TXN_BYTES):
                yield batch
                batch, size = [], 0
            batch.append(op)
            size += op.size
        if batch:
            yield batch

    def clear(self) -> bool:
        """One transaction deletes the records and the host key, guarded by the host key (nothing
        is deleted when the address is another engine's now); then the lease is revoked, unless
        keys of others ride on it: those are left to expire with it, never taken along."""
        if self._host_stored is None:
            return False  # this registrar never held the address: nothing here is its own
        start = self.host_dir + "/"
        self.scope.check(self.host_dir, host_dir=True)
        guard = [{"key": _b64(self.host_dir), "target": "VALUE", "result": "EQUAL",
                  "value": _b64(self._host_stored)}]
        # every key space of this host's scope (one of `*` segments, the next issue's services
        # index, is not one range: its keys will be deleted one by one, as found by a read)
        ranges = [{"request_delete_range": {"key": _b64(f"{space}/"),
                                            "range_end": _b64(_range_end(f"{space}/"))}}
                  for space in self.scope.spaces if "*" not in space]
        answer = self._post("/kv/txn", {"compare": guard, "success": [
            *ranges, {"request_delete_range": {"key": _b64(self.host_dir)}}]}, self.host_dir, final=True)
        if not answer.get("succeeded"):
            if self._get(self.host_dir) is None:  # the lease went, and the keys with it
                log_event(logging.INFO, f"nothing left to delete under {start} on exit: the lease had "
                          "expired or been revoked", event="deregister_skipped")
                return True
            log_event(logging.WARNING, f"not deleting {start} on exit: its host key no longer holds this "
                      "registrar's record (another registrar or an operator changed it); it is left as "
                      "it is", event="deregister_skipped")
            return False
        with self._lock:
            lease, self.lease = self.lease, None
        if lease:
            try:
                left, _, keys = self._lease_ttl(lease, final=True)
                if left > 0 and not self._say_foreign(lease, keys, "this registrar's own keys are "
                                                      "deleted; the lease is not revoked, and expires "
                                                      f"with them within {self.ttl} s"):
                    with contextlib.suppress(LeaseGone):  # gone already: so are the keys on it
                        self._post("/lease/revoke", {"ID": str(lease)}, f"lease {lease:x}", final=True)
            except Unavailable as exc:  # the keys are gone: the lease only expires by itself
                log_event(logging.WARNING, f"deleted {start} on exit, but lease {lease:x} could not be "
                          f"revoked ({exc}); it expires with its TTL", event="revoke_failed")
        return True


class _Raced(Exception):
    """The host key changed between its read and a guarded write: read it again."""


def make_registry(config: Config, pool: ThreadPoolExecutor | None = None) -> Registry:
    """The adapter for ETCD_API; v2 sends its requests one per key, on `pool`."""
    return EtcdV3Registry(config) if config.etcd_api == 3 else EtcdV2Registry(config, pool)


# ---------------------------------------------------------------------------------------------
# 9. Docker: the engine adapter. It knows containers and events and nothing of etcd.
# ---------------------------------------------------------------------------------------------

CONTAINER_ACTIONS = ("start", "die", "destroy")
# A running container's published ports change with its networks, without a start or a die
NETWORK_ACTIONS = ("connect", "disconnect")


class DockerEngine:
    TIMEOUT = 30  # seconds for one request (the event stream has none)

    def __init__(self, address: str = DEFAULT_DOCKER_HOST):
        self._api: docker.APIClient | None = None
        self._lock = threading.Lock()
        self._stream = None
        self.address = address  # validated by the configuration: no credentials, a usable scheme
        self._pending: dict[int, float] = {}  # requests under way -> when each was sent (/healthz)
        # a lock of its own: _lock is held while the client is made, which asks Docker its version
        self._pending_lock = threading.Lock()
        self._requests = itertools.count()
        self._engine_id: str | None = None

    @contextlib.contextmanager
    def _request(self):
        token = next(self._requests)
        with self._pending_lock:
            self._pending[token] = time.monotonic()
        try:
            yield
        finally:
            with self._pending_lock:
                del self._pending[token]

    def waiting_since(self) -> float | None:
        """When the oldest request still under way was sent (a Docker that hangs), or None."""
        with self._pending_lock:
            return min(self._pending.values(), default=None)

    def _client(self) -> docker.APIClient:
        with self._lock:
            if self._api is None:
                try:
                    settings = {**docker.utils.kwargs_from_env(), "base_url": self.address}
                    self._api = docker.APIClient(version="auto", timeout=self.TIMEOUT, **settings)
                except docker.errors.DockerException as exc:
                    raise self._unavailable(exc) from exc
            return self._api

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        return EngineUnavailable(f"Docker at {self.address} failed: {describe(exc)}")

    def engine_id(self) -> str:
        """The engine's ID (`docker info`: ID), which the registry records as the owner of this
        HOST_IP; asked once (it lives as long as the engine's data directory)."""
        if self._engine_id is None:
            try:
                with self._request():
                    info = self._client().info()
            except (requests.exceptions.RequestException, docker.errors.APIError) as exc:
                raise self._unavailable(exc) from exc
            engine = info.get("ID") if isinstance(info, dict) else None
            if not isinstance(engine, str) or not engine.strip():
                raise EngineUnavailable(f"Docker at {self.address} named no engine ID (docker info: ID)")
            self._engine_id = plain_word(engine)
        return self._engine_id

    def running(self) -> list[dict]:
        """The container list (running and paused ones): one request for all of them."""
        try:
            with self._request():
                return self._client().containers()
        except (requests.exceptions.RequestException, docker.errors.APIError) as exc:
            raise self._unavailable(exc) from exc

    def inspect(self, container_id: str) -> dict | None:
        """The container's inspect data; None when it no longer exists."""
        try:
            with self._request():
                return self._client().inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        except requests.exceptions.RequestException as exc:
            raise self._unavailable(exc) from exc
        except docker.errors.APIError as exc:  # Docker answered and could not describe this one
            raise ContainerUnreadable(describe(exc)) from exc

    def events(self, since: str | None):
        """Subscribe to container events; the connection is made before this returns."""
        try:
            stream = self._client().events(
                since=since, decode=True,
                filters={"type": ["container", "network"],
                         "event": [*CONTAINER_ACTIONS, *NETWORK_ACTIONS]})
        except (requests.exceptions.RequestException, docker.errors.APIError) as exc:
            with self._lock:
                self._api = None
            raise self._unavailable(exc) from exc
        self._stream = stream
        return stream

    def close(self) -> None:
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a half-broken socket: nothing to do
                stream.close()


# ---------------------------------------------------------------------------------------------
# 10. Liveness: the heartbeat on its own thread, and who vouches for the records
# ---------------------------------------------------------------------------------------------



class Heartbeat:
    """One keepalive (v3) or refresh (v2) every TTL/3, on a thread of its own.

    Nothing the reconciler does holds it back: a registry that refuses every write, a backoff of
    ten seconds, a hundred inspects. Each attempt waits at most what is left of its interval, and
    no more than an even share of the interval per endpoint; an endpoint that did not answer
    hands over to the next at once, so one silent member cannot hold a heartbeat past the TTL
    while another answers. It runs only while Docker vouches for the records (`vouch`) and once
    the reconciler made or adopted the liveness (`renewed`).
    """

    MIN_ATTEMPT = 0.5  # seconds: the shortest wait for an answer worth making

    def __init__(self, registry: Registry, ttl: int, vouch: Callable[[], bool],
                 lost: Callable[[str], None], fatal: Callable[[str], None], stop: threading.Event):
        self.registry, self.ttl = registry, ttl
        self.interval = ttl / 3
        self._vouch, self._lost, self._fatal, self.stop = vouch, lost, fatal, stop
        self._cond = threading.Condition()
        self._timer = Timer(self.interval, due_now=False)
        self._retries = RetrySchedule(first=0.25, cap=max(0.5, self.interval / 4))
        self._live = False  # there is a liveness to keep (made or adopted by the reconciler)
        self._generation = 0  # how many times the reconciler renewed it: a loss found by an attempt
        # made before the latest renewal concerns the liveness that renewal replaced
        self._window_end: float | None = None  # when the interval of the attempts under way ends
        self.failures = 0  # attempts failed since the last one etcd answered
        self.beat_at: float | None = None  # monotonic time the liveness was last extended

    def renewed(self, adopted: bool) -> None:
        """The reconciler made the liveness anew (its whole TTL ahead: the next heartbeat after
        TTL/3) or adopted one from a run before (it may have little left: at once)."""
        with self._cond:
            self._live = True
            self._generation += 1
            if adopted:
                self._timer.expire()
            else:
                self._timer.restart()
                self.beat_at = time.monotonic()
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def live(self) -> bool:
        """There is a liveness to keep: False from a loss until the reconciler renews it."""
        with self._cond:
            return self._live

    def run(self) -> None:
        while not self.stop.is_set():
            wait = self.step()
            with self._cond:
                if not self.stop.is_set():
                    self._cond.wait(MAX_WAIT if wait is None else min(wait, MAX_WAIT))

    def step(self) -> float | None:
        """One attempt, when one is due; seconds until the next call (None: until woken)."""
        with self._cond:
            if not self._live:
                return None
            if not self._timer.due():
                return self._timer.remaining()
            due_at, generation = self._timer.due_at, self._generation
        if not self._vouch():
            return None  # Docker is back: set_events_connected wakes this thread
        now = time.monotonic()
        if self._window_end is None:
            self._window_end = max(due_at, now - self.interval) + self.interval
        while self._window_end <= now:
            self._window_end += self.interval
        share = max(1.0, self.interval / len(self.registry.endpoints))
        timeout = max(self.MIN_ATTEMPT, min(float(Registry.TIMEOUT), share, self._window_end - now))
        try:
            lost = self.registry.heartbeat(timeout)
        except HeartbeatFailed as exc:
            return self._failed(exc, slow=time.monotonic() - now >= 0.9 * timeout)
        except ApiMismatch as exc:
            self._fatal(str(exc))
            return None
        except Exception as exc:  # a bug: said whole, retried with backoff
            log.exception("unexpected error in the heartbeat: %s", exc)
            return self._retries.next_delay()
        if self.failures:
            log_event(logging.INFO, f"heartbeat of {self.registry.liveness()} answered by "
                      f"{self.registry.beat_endpoint.url} after {self.failures} failed attempt(s)",
                      event="heartbeat_recovered", failures=self.failures)
        self.failures, self._window_end = 0, None
        self._retries.reset()
        with self._cond:
            if generation != self._generation:
                return 0.0  # renewed meanwhile: this answer was about the liveness it replaced
            self._timer.restart()
            if lost:
                self._live = False  # until the reconciler makes it anew
            else:
                self.beat_at = time.monotonic()
        if lost:
            self._lost(lost)
        return self.interval

    def _failed(self, exc: HeartbeatFailed, slow: bool) -> float:
        """The next endpoint at once after a timeout; after a quick refusal, a short backoff."""
        self.failures += 1
        delay = 0.0 if slow else self._retries.next_delay()
        now = time.monotonic()
        expires = "" if self.beat_at is None else (
            f" (it expires in {max(0.0, self.beat_at + self.ttl - now):.1f} s unless a heartbeat lands)")
        log_event(logging.WARNING, f"heartbeat of {self.registry.liveness()} failed at {exc.endpoint}: "
                  f"{exc.cause}; retrying in {delay:.1f} s at {exc.next}{expires}", event="heartbeat_retry",
                  endpoint=exc.endpoint, next=exc.next, cause=exc.cause, retry_in=round(delay, 3))
        return delay


class Liveness:
    """Whether Docker vouches for this host's records, and the heartbeat that keeps them alive
    while it does.

    The TTL is refreshed only while Docker's event stream is connected. Without Docker nobody
    can tell which containers still run (without live-restore they all died with dockerd), so
    the records are left to expire with their liveness instead of being kept alive blind. A
    heartbeat is due as soon as the stream is back.
    """

    def __init__(self, registry: Registry, ttl: int, stop: threading.Event,
                 lost: Callable[[str], None], fatal: Callable[[str], None]):
        self.registry, self.ttl = registry, ttl
        self._lock = threading.Lock()
        self._connected = False
        # Docker failed to answer or its stream broke (False too before the first attempt: at
        # start, not being connected yet says nothing of Docker)
        self._docker_down = False
        self._suspended = False  # Docker is unreachable: this host's records are unvouched
        self._said = False  # the suspension was said, once per outage
        self._prepared = False  # the registry's liveness was found or made once
        # on its own thread (main starts it): every TTL/3 whatever the reconciler does
        self.heartbeat = Heartbeat(registry, ttl, self.vouch, lost, fatal, stop) if ttl else None

    def docker(self, connected: bool) -> None:
        """Docker's event stream came (True) or went (False)."""
        with self._lock:
            self._connected = connected
            self._docker_down = not connected
            if connected:
                self._suspended = False
            warn = not connected and self._suspended and not self._said  # suspended before
            self._said = self._said or warn  # Docker's first answer, said once it is known down
        if warn:
            self._say_suspended()
        if connected:
            self.wake()  # a heartbeat that waited for Docker is due at once

    def vouch(self) -> bool:
        """Called by the heartbeat before each attempt: whether Docker vouches for the records."""
        with self._lock:
            connected = self._connected
            suspending = not connected and not self._suspended
            if suspending:
                self._suspended = True
            # said once per outage, also when a stream that Docker closes at once comes and goes,
            # and only once Docker is known to be down: not for the moment before its first answer
            warn = suspending and not self._said and self._docker_down
            self._said = not connected and (self._said or warn)
        if warn:
            self._say_suspended()
        return connected

    def prepared(self, recreated: bool) -> None:
        """The registry's liveness is in place (`recreated`: made anew). Adopted from a run before,
        it may have less than TTL/3 left: refreshed as soon as Docker vouches; a new one has its
        whole TTL."""
        heartbeat = self.heartbeat
        if heartbeat is not None and (recreated or not self._prepared or not heartbeat.live):
            heartbeat.renewed(adopted=not self.registry.granted_new)
        self._prepared = True

    def wake(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.wake()

    def _say_suspended(self) -> None:
        log_event(logging.WARNING, f"Docker is unreachable: no longer refreshing the "
                  f"{self.registry.REFRESHED} of {self.registry.host_dir}; its records expire within "
                  f"{self.ttl} s unless Docker returns", event="refresh_suspended")


# ---------------------------------------------------------------------------------------------
# 11. Status: what the service's threads report, published as one immutable snapshot
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """The service's state at one moment: /healthz reads it; nothing here waits for a thread."""
    events_connected: bool = False
    last_error: str | None = None  # what failed last, until it works again
    blocked: str | None = None  # what waits for an operator (RegistryBlocked), until it works
    reconciled_at: float | None = None  # monotonic time of the last full reconcile done
    full_reconciles: int = 0
    records: int = 0  # containers whose records are known to be in etcd
    fatal: str | None = None  # why the service must exit (code 2) instead of retrying


class Status:
    """The one place the reconciler, the event thread and the heartbeat report to: every change
    replaces the snapshot under one lock, so a reader gets a consistent one without waiting."""

    def __init__(self):
        self._lock = threading.Lock()
        self._now = Snapshot()

    def update(self, **changes) -> None:
        with self._lock:
            self._now = dataclasses.replace(self._now, **changes)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._now


# ---------------------------------------------------------------------------------------------
# 12. Reconciler: desired state (Docker) against actual state (etcd)
# ---------------------------------------------------------------------------------------------

class Reconciler:
    """Keeps the host's keys equal to the running containers, and orchestrates: it takes work
    from its WorkQueue, asks Docker what is wanted, plans (`plan`), applies the plan through the
    registry and logs it; Liveness keeps the records alive, Status says how it goes.

    A single worker thread does all writing. Events only mark containers dirty; a full reconcile
    runs on start, on every reconnect to Docker, when the host's liveness was lost, after an etcd
    failure, and every `resync` seconds.
    """

    WORKERS = 8

    def __init__(self, config: Config, registry: Registry, engine: DockerEngine,
                 stop: threading.Event, pool: ThreadPoolExecutor | None = None,
                 schedule: Callable[[], RetrySchedule] = RetrySchedule):
        self.config = config
        self.registry = registry
        self.engine = engine
        self.stop = stop
        self.queue = WorkQueue(config.resync, stop)
        self.status = Status()
        self.liveness = Liveness(registry, config.ttl, stop, self._liveness_lost, self._fail)
        self.heartbeat = self.liveness.heartbeat  # main runs it on a thread of its own
        self.known: dict[str, Entry] = {}  # container id -> entry known to be in etcd
        self._pool = pool or ThreadPoolExecutor(self.WORKERS, thread_name_prefix="io")
        self._failures = schedule()
        # unexpected errors (bugs) back off on a schedule of their own, which a step that happens
        # to succeed in between does not reset: a bug that recurs can never loop without a wait
        self._bugs = schedule()
        self._bug_at = 0.0
        self._lost_streak = 0  # HostLost in a row, without a step that worked in between
        self._error_said = 0.0  # when an error that waits for an operator was last logged
        # the last warning about each container that is not registered (odd data, too large): said
        # once, not at every resync; forgotten with the container
        self._warned: dict[str, str] = {}
        self._warned_lock = threading.Lock()

    # -- inputs from other threads -----------------------------------------------------------

    def mark_dirty(self, container_id: str, stopped: bool | None = False) -> None:
        """A container to look at (see WorkQueue.add)."""
        self.queue.add(container_id, stopped)

    def set_events_connected(self, connected: bool) -> None:
        if connected:
            self.queue.resume("connected to Docker's event stream")
        else:
            self.queue.pause()
        self.status.update(events_connected=connected)
        self.liveness.docker(connected)

    def wake(self) -> None:
        self.queue.wake()
        self.liveness.wake()

    def _liveness_lost(self, lost: str) -> None:
        """The heartbeat found the liveness gone: the next step makes it anew (the registry says
        so then) and registers everything again."""
        self.queue.add_full(f"{self.registry.LIVENESS} had expired")

    def _fail(self, message: str) -> None:
        """Something that never fixes itself (ApiMismatch): the service exits, code 2."""
        self.status.update(fatal=message)
        self.stop.set()
        self.wake()

    # -- the worker ------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stop.is_set():
            self.step()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def step(self) -> None:
        """One turn: the work pending, done (or retried after a backoff), or a wait for work."""
        try:
            self._work()
        except ApiMismatch as exc:  # never fixes itself: the service exits, code 2
            self._fail(str(exc))
        except HostLost as exc:
            self.queue.add_full(self.registry.made_anew())
            self._lost_streak += 1
            if self._lost_streak > 1:  # found lost again before anything worked: not at once
                # (two registrars of one engine, say, each rewriting the host key in turn)
                self._back_off(str(exc))
        except Unavailable as exc:
            if isinstance(exc, RegistryUnavailable):
                # A request that timed out may still have been applied, and etcd may have been
                # wiped or restored meanwhile: what it holds is read again before any write.
                self.queue.add_full("etcd failed: re-reading what it holds")
            blocked = isinstance(exc, RegistryBlocked)  # an operator must act: an error
            self.status.update(blocked=str(exc) if blocked else None)
            self._back_off(str(exc), logging.ERROR if blocked else logging.WARNING,
                           event=getattr(exc, "event", "retry"), **getattr(exc, "fields", {}))
        except Exception as exc:  # a bug: log it whole, keep serving
            log.exception("unexpected error in the reconciler: %s", exc)
            self._bug_at = time.monotonic()
            self._back_off(f"unexpected error: {exc}", schedule=self._bugs)
        finally:
            self.status.update(records=len(self.known))

    def _back_off(self, cause: str, level: int = logging.WARNING, event: str = "retry",
                  schedule: RetrySchedule | None = None, **fields) -> None:
        delay = (schedule or self._failures).next_delay()
        if level >= logging.ERROR:  # waits for an operator: said again once a minute, not per retry
            now = time.monotonic()
            if cause == self.status.snapshot().last_error and now - self._error_said < 60:
                level = logging.DEBUG
            else:
                self._error_said = now
        pending = self.queue.pending()
        log_event(level,
                  f"{cause}; {pending} container(s) pending; retrying in {delay:.1f} s",
                  event=event, cause=cause, retry_in=round(delay, 3), pending=pending, **fields)
        self.status.update(last_error=cause)
        self.stop.wait(delay)

    def _recovered(self) -> None:
        down = self.status.snapshot().last_error  # what failed last, until it works again
        if down is not None:
            log_event(logging.INFO, f"recovered after {self._failures.failures} failed attempt(s); "
                      f"last cause: {down}", event="recovered")
        self.status.update(last_error=None, blocked=None)
        self._lost_streak = 0
        self._failures.reset()
        if time.monotonic() - self._bug_at > 60:
            self._bugs.reset()

    def _work(self) -> None:
        self.registry.check_api()  # a configuration that can never work exits before Docker is asked
        if self.registry.engine_id is None:  # whose records these are: asked once Docker answers
            if self.queue.paused:
                self.queue.wait()
                return
            self.registry.engine_id = self.engine.engine_id()
        recreated = self.registry.prepare()
        self.liveness.prepared(recreated)
        if recreated:
            self.queue.add_full(self.registry.made_anew())
        full, dirty = self.queue.take()
        if full is not None:
            self._full_reconcile(full, dirty)
        elif dirty:
            self._sync(dirty)
        self._recovered()
        if full is None and not dirty:
            self.queue.wait()

    # -- desired state ---------------------------------------------------------------------

    def _desired(self, container_id: str, stopped: bool = False, listed: dict | None = None):
        """Entry, None (no record wanted) or UNKNOWN (its records are left as they are this time:
        Docker could not tell, or etcd refused the record and its next attempt is not due).

        A container whose latest event says it stopped wants no record, and is not inspected:
        Docker answers an inspect only once it has torn the container's network down (about
        0.1 s), and the record must go at once. A start event after it would say otherwise.
        `listed` is what the container list told (inspect_from_summary), when it could.
        """
        if stopped:
            return None
        if self.queue.refusal_pending(container_id):  # etcd refused its record: it waits its turn
            return UNKNOWN
        inspect = listed
        if inspect is None:
            try:
                inspect = self.engine.inspect(container_id)
            except ContainerUnreadable as exc:
                log_event(logging.WARNING, f"skipping container {container_id[:12]}: inspect failed: "
                          f"{exc}; its record is left as it is until the next resync",
                          event="skipped", id=container_id[:12])
                return UNKNOWN
            if inspect is None:
                return None
        try:
            if ignored(inspect):
                self._warn_once(container_id, f"container {container_name(inspect)} ({container_id[:12]}) "
                                f"not registered: labelled {IGNORE_LABEL}=true", level=logging.INFO,
                                event="ignored", container=container_name(inspect), id=container_id[:12])
                return None
            return desired_entry(inspect, self.config.host_ip, self.config.prefix,
                                 self.config.max_record_bytes)
        except RecordError as exc:
            what = "not registered" if isinstance(exc, RecordTooLarge) else "treated as publishing nothing"
            self._warn_once(container_id, f"container {container_name(inspect)} ({container_id[:12]}) "
                            f"{what}: {exc}", event="bad_container", container=container_name(inspect),
                            id=container_id[:12], cause=str(exc))
            return None

    def _warn_once(self, container_id: str, message: str, level: int = logging.WARNING, **fields) -> None:
        """A line about a container that is not registered, said again only when it changes."""
        with self._warned_lock:
            if self._warned.get(container_id) == message:
                return
            self._warned[container_id] = message
        log_event(level, message, **fields)

    def _forget(self, container_ids: Iterable[str]) -> None:
        """Containers that no longer run: nothing to retry or to warn about for them."""
        container_ids = list(container_ids)
        self.queue.forget(container_ids)
        with self._warned_lock:
            for container_id in container_ids:
                self._warned.pop(container_id, None)

    def _desired_all(self, container_ids: Iterable[str], stopped: Iterable[bool] = (),
                     listed: Iterable[dict | None] = ()) -> dict:
        ids = list(container_ids)
        flags = list(stopped) or [False] * len(ids)
        known = list(listed) or [None] * len(ids)
        # only an inspect is I/O: what the container list or a stop event told is worked out here,
        # without a hand-off to the pool per container (measured: 500 of them cost ~30 ms)
        inspect = [i for i, (flag, summary) in enumerate(zip(flags, known)) if not flag and summary is None]
        results = dict(zip((ids[i] for i in inspect), self._map(
            self._desired, [ids[i] for i in inspect], [False] * len(inspect), [None] * len(inspect))))
        return {cid: results[cid] if cid in results else self._desired(cid, flag, summary)
                for cid, flag, summary in zip(ids, flags, known)}

    def _map(self, function: Callable, *iterables) -> list:
        """On the I/O pool; a single item on this thread, saving the hand-offs for one event."""
        columns = [list(iterable) for iterable in iterables]
        if len(columns[0]) <= 1:
            return list(map(function, *columns))
        return list(self._pool.map(function, *columns))

    # -- the two paths: an event's containers, and everything --------------------------------

    def _sync(self, dirty: dict[str, bool]) -> None:
        """Bring the dirty containers' keys in line, in one batch: removals first, then writes (on
        v3, one event's change is one request). A record etcd refuses is retried alone; on any
        other failure the containers not done stay dirty."""
        try:
            wanted = self._desired_all(dirty, dirty.values())
        except Exception:  # Docker failed: every one of them stays dirty
            self.queue.requeue(dirty)
            raise
        self._forget([cid for cid, stopped in dirty.items() if stopped])
        for container_id, want in wanted.items():
            if want is None:  # nothing to write: nothing to retry
                self.queue.accepted(container_id)
        found = {key: value for cid in dirty if cid in self.known for key, value in self.known[cid].records}
        running = [cid for cid, stopped in dirty.items() if not stopped]
        changes = plan(wanted, found, self.known, running=running)
        for entry in changes.untouched:
            self.known[entry.container_id] = entry
        done: set[str] = set()
        try:
            self._apply(changes, done=done)
        except Exception:
            involved = {r.entry.container_id for r in (*changes.removals, *changes.registrations) if r.entry}
            self.queue.requeue({cid: dirty[cid] for cid in involved - done if cid in dirty})
            raise

    def _full_reconcile(self, reasons: list[str], dirty: dict[str, bool]) -> None:
        try:
            self._full_reconcile_once(reasons, dirty)
        except Exception:
            self.queue.add_full(*reasons)
            self.queue.requeue(dirty)
            raise
        self.status.update(reconciled_at=time.monotonic(),
                           full_reconciles=self.status.snapshot().full_reconciles + 1)
        self.queue.resynced()

    def _full_reconcile_once(self, reasons: list[str], dirty: dict[str, bool]) -> None:
        """Every running container against everything this host holds in etcd.

        `dirty` are the events taken with it: Docker sends `die` before its container list stops
        showing the container as running, so the latest event of a container wins over the list,
        a container that stopped lately is inspected (the inspect waits for the teardown), and a
        container that started but is not listed yet is inspected too.
        """
        started = time.monotonic()
        lately = self.queue.stopped_lately()
        listed = {c["Id"]: None if c["Id"] in lately else inspect_from_summary(c)
                  for c in self.engine.running()}
        self.queue.listed(listed, lately, started)
        ids = [*listed, *(cid for cid, stopped in dirty.items() if cid not in listed and not stopped)]
        with self._warned_lock:
            warned = set(self._warned)
        self._forget((self.queue.refused_ids() | warned) - set(ids))
        wanted = self._desired_all(ids, [dirty.get(cid, False) for cid in ids],
                                   [listed.get(cid) for cid in ids])
        actual = self.registry.read()
        changes = plan(wanted, actual.values, self.known, running=listed, detached=actual.detached)
        self.known = {entry.container_id: entry for entry in changes.untouched}
        # what stays: the adapter tidies around it (v2: directories that hold none of it)
        refused = self._apply(changes, keep=changes.keep(actual.values))
        self._say_reconciled(reasons, changes, refused, started)

    def _say_reconciled(self, reasons: list[str], changes: Plan, refused: int, started: float) -> None:
        wanted = len(changes.registrations) + len(changes.untouched)
        refused_ids = self.queue.refused_ids()
        held = sum(1 for cid in changes.held if cid in refused_ids)  # refused earlier, not due yet
        written = len(changes.registrations) - refused
        waiting = refused + held
        routine = reasons == ["periodic resync"] and not changes.registrations and not changes.removals
        log_event(logging.DEBUG if routine else logging.INFO,
                  f"full reconcile ({', '.join(reasons)}): {wanted + held} record(s), "
                  f"{written} written, {len(changes.removals)} removed, {len(changes.untouched)} already "
                  "right, " + (f"{waiting} refused by etcd and retried alone, " if waiting else "")
                  + f"in {time.monotonic() - started:.2f} s",
                  event="reconciled", records=wanted + held, written=written,
                  removed=len(changes.removals), refused=waiting)

    # -- applying a plan, and saying what was done -------------------------------------------

    def _apply(self, changes: Plan, keep: set | None = None, done: set | None = None) -> int:
        """One batch through the registry: the plan's deletes, then its puts. A container's
        removal or registration is logged, and known, as soon as all its keys are done; `done`
        collects the ids of containers done. Returns how many registrations etcd refused."""
        items = (*changes.removals, *changes.registrations)
        owner = {key: item for item in items for key in item.keys}
        left = {item: set(item.keys) for item in items}
        refusals: dict = {}
        lock = threading.Lock()  # the v2 adapter reports from the I/O pool's threads

        def report(key: str, refusal: RecordRefused | None) -> None:
            item = owner[key]
            with lock:
                left[item].discard(key)
                if refusal is not None:
                    refusals.setdefault(item, refusal)
                if left[item]:
                    return
            if isinstance(item, Removal):
                self._removed(item)
            elif item in refusals:
                self._refusal(item.entry, refusals[item])
            else:
                self._registered(item)
            if done is not None and item.entry is not None:
                done.add(item.entry.container_id)

        self.registry.apply(changes.deletes, changes.puts, report, keep)
        return len(refusals)

    def _registered(self, registration: Registration) -> None:
        entry = registration.entry
        self.queue.accepted(entry.container_id)
        self.known[entry.container_id] = entry
        verb = "updated" if registration.existed else "registered"
        log_event(logging.INFO, f"{verb} {entry.name} ({entry.container_id[:12]}) image {entry.image} "
                  f"ports {entry.ports}", event=verb, container=entry.name,
                  id=entry.container_id[:12], image=entry.image, ports=entry.ports, key=entry.key)

    def _removed(self, removal: Removal) -> None:
        entry, key = removal.entry, removal.keys[0]
        if entry is None:  # found in etcd, not known: `why` describes what it was
            log_event(logging.INFO, f"removed stale {removal.why}: no such running container",
                      event="removed", key=key)
            return
        held = self.known.get(entry.container_id)
        if held is not None and held.key in removal.keys:
            self.known.pop(entry.container_id, None)
        log_event(logging.INFO, f"removed {entry.name} ({entry.container_id[:12]}) image {entry.image} "
                  f"ports {entry.ports}: {removal.why}", event="removed", container=entry.name,
                  id=entry.container_id[:12], image=entry.image, ports=entry.ports, key=key)

    def _refusal(self, entry: Entry, exc: RecordRefused) -> None:
        """etcd refused this container's record: it is retried alone, with a backoff of its own;
        said once (and again if the reason changes), not at every attempt."""
        delay, first = self.queue.refused(entry.container_id, str(exc))
        log_event(logging.WARNING if first else logging.DEBUG,
                  f"could not register {entry.name} ({entry.container_id[:12]}) image {entry.image}: "
                  f"{exc}; retrying this container alone in {delay:.1f} s (backoff up to "
                  f"{REFUSED_RETRY_CAP:.0f} s), the others are not held back", event="refused",
                  container=entry.name, id=entry.container_id[:12], image=entry.image, cause=str(exc),
                  retry_in=round(delay, 3), key=entry.key)


# ---------------------------------------------------------------------------------------------
# 13. Events: Docker's event stream, followed for ever
# ---------------------------------------------------------------------------------------------

def since_from(event: Mapping) -> str | None:
    """Docker's `since=` form (seconds.nanoseconds) for resuming after this event."""
    nanos = event.get("timeNano")
    if isinstance(nanos, int):
        return f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"
    seconds = event.get("time")
    return str(seconds) if isinstance(seconds, int) else None


def event_container(event: Mapping) -> tuple[str, bool | None] | None:
    """(container id, whether it stopped) for an event that can change a container's records:
    start, die and destroy say whether it runs; a network connect or disconnect says nothing of
    that (None). None for any other event."""
    kind = event.get("Type", "container")
    action = event.get("Action", event.get("status"))
    actor = event.get("Actor") or {}
    if kind == "container" and action in CONTAINER_ACTIONS:
        container_id = event.get("id") or actor.get("ID")
        return (container_id, action != "start") if isinstance(container_id, str) and container_id else None
    if kind == "network" and action in NETWORK_ACTIONS:
        container_id = (actor.get("Attributes") or {}).get("container")
        return (container_id, None) if isinstance(container_id, str) and container_id else None
    return None


MIN_STREAM_SECONDS = 5.0  # an event stream that ends sooner counts as a failed connection


def follow_events(engine: DockerEngine, reconciler: Reconciler, stop: threading.Event) -> None:
    """Feed container ids from Docker's event stream to the reconciler; reconnect for ever.

    A stream that Docker (or a proxy in between) closes right after opening it counts as a
    failure: reconnecting goes through the backoff, not a tight loop. The backoff is reset only
    once a stream has lived MIN_STREAM_SECONDS.
    """
    since: str | None = None
    failures = RetrySchedule()
    ever_connected = False
    while not stop.is_set():
        try:
            stream = engine.events(since)
        except Unavailable as exc:
            reconciler.set_events_connected(False)  # Docker did not answer: nobody vouches now
            delay = failures.next_delay()
            what = "waiting for Docker" if not ever_connected else "reconnecting to Docker"
            log_event(logging.WARNING, f"{what}: {exc}; retrying in {delay:.1f} s",
                      event="retry", cause=str(exc), retry_in=round(delay, 3))
            stop.wait(delay)
            continue
        if ever_connected:
            log_event(logging.INFO, f"reconnected to Docker at {engine.address} after "
                      f"{failures.failures} failed attempt(s), resuming events since {since}",
                      event="reconnected", since=since)
        else:
            log_event(logging.INFO, f"connected to Docker at {engine.address}", event="connected")
        ever_connected = True
        opened = time.monotonic()
        reconciler.set_events_connected(True)
        cause = "the stream was closed by Docker"
        try:
            for event in stream:
                since = since_from(event) or since
                target = event_container(event)
                if target is not None:
                    reconciler.mark_dirty(*target)
        except Exception as exc:  # the connection broke: Docker may be gone
            cause = describe(exc)
            reconciler.set_events_connected(False)
        # A stream Docker closed cleanly says nothing of Docker itself: the next subscription
        # tells. Meanwhile the reconciler goes on (each subscription brings a full reconcile, so a
        # stream that a proxy keeps closing still leaves the records right).
        if stop.is_set():
            break
        lived = time.monotonic() - opened
        if lived >= MIN_STREAM_SECONDS:
            failures.reset()
            log_event(logging.WARNING, f"lost Docker's event stream ({cause}); reconnecting",
                      event="disconnected", cause=cause)
            continue
        delay = failures.next_delay()
        log_event(logging.WARNING, f"lost Docker's event stream ({cause}) {lived:.1f} s after it opened; "
                  f"reconnecting in {delay:.1f} s", event="disconnected", cause=cause,
                  retry_in=round(delay, 3))
        stop.wait(delay)


# ---------------------------------------------------------------------------------------------
# 14. Health: GET /healthz for the image's HEALTHCHECK, systemd and operators
# ---------------------------------------------------------------------------------------------

HEALTH_PATH = "/healthz"
HEALTHCHECK_TIMEOUT = 3.0  # seconds `register.py healthcheck` waits for an answer, in all
HEALTH_BODY_LIMIT = 64 * 1024  # bytes of an answer it reads (a health body takes 300)


class Health:
    """What /healthz says. Read from the reconciler's Status snapshot, the registry's last
    answer and the Docker adapter's requests under way, each under a lock held for no longer
    than a read: a health probe never waits for the reconciler (a worker stuck in a request
    shows here as what it waits for)."""

    DOCKER_WAIT = 5.0  # seconds a request to Docker may take before it is a reason (one takes ms)

    def __init__(self, config: Config, status: Status, registry: Registry,
                 engine: DockerEngine | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.status = status
        self.registry = registry
        self.engine = engine
        self.clock = clock
        # etcd must have answered within the longest gap between two requests of a healthy
        # service (the heartbeat every TTL/3, the resync every REGISTER_RESYNC), plus the time one
        # request may take: a resync asks etcd only after Docker's list (without a TTL, nothing
        # else asks it), and a flapping signal would be worse than a late one
        self.etcd_limit = max(config.ttl, config.resync) + Registry.TIMEOUT
        self.reconcile_limit = 2 * config.resync

    def report(self) -> tuple[bool, dict]:
        """(healthy, the JSON body)."""
        now = self.clock()
        reasons = []
        status = self.status.snapshot()
        connected = status.events_connected
        if not connected:
            reasons.append("Docker's event stream is not connected")
        blocked = status.blocked
        if blocked:  # etcd answers, and refuses: nothing registers until an operator acts
            reasons.append(f"blocked until an operator acts: {blocked}")
        waiting = self.engine.waiting_since() if self.engine is not None else None
        if waiting is not None and now - waiting > self.DOCKER_WAIT:
            reasons.append(f"a request to Docker has been waiting {now - waiting:.1f} s")
        etcd_age = self._age(now, self.registry.answered_at, self.etcd_limit, reasons,
                             "etcd has not answered yet", "etcd last answered")
        reconcile_age = self._age(now, status.reconciled_at, self.reconcile_limit, reasons,
                                  "no full reconcile has succeeded yet",
                                  "the last full reconcile succeeded")
        body = {"status": "unhealthy" if reasons else "ok"}
        if reasons:
            body["reasons"] = reasons
            if status.last_error:
                body["last_error"] = status.last_error
        body.update({"host_ip": self.config.host_ip, "etcd_api": self.config.etcd_api,
                     "docker_events": "connected" if connected else "disconnected",
                     "etcd_answered_seconds_ago": etcd_age, "full_reconcile_seconds_ago": reconcile_age,
                     "records": status.records})
        return not reasons, body

    @staticmethod
    def _age(now: float, at: float | None, limit: int, reasons: list[str], never: str,
             last: str) -> float | None:
        """Seconds since `at` (None: never), with a reason added when it is never or over `limit`."""
        age = None if at is None else round(now - at, 1)
        if age is None:
            reasons.append(never)
        elif age > limit:
            reasons.append(f"{last} {age} s ago (limit {limit} s)")
        return age


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    server_version = f"docker-etcd-register/{VERSION}"
    timeout = 5  # a client that sends nothing does not hold its thread for long

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        if urllib.parse.urlsplit(self.path).path != HEALTH_PATH:
            status, body = 404, {"error": f"not found; the health signal is GET {HEALTH_PATH}"}
        else:
            healthy, body = self.server.health.report()
            status = 200 if healthy else 503
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, template: str, *args) -> None:
        log.debug("health server: %s %s", self.address_string(), template % args)


class HealthServer(http.server.ThreadingHTTPServer):
    """The standard library's threaded HTTP server, on its own thread: each request gets a
    thread of its own, so a slow client delays nobody. Clients that connect and say nothing, or
    drip their request, cannot pile up threads (an adversarial pass made 1,500 of them): at most
    MAX_CLIENTS are served at once, one more is closed at once, and a request still under way
    after REQUEST_SECONDS has its connection shut."""

    daemon_threads = True
    request_queue_size = 64  # a burst of probes waits in the kernel's queue, not refused
    MAX_CLIENTS = 16
    REQUEST_SECONDS = 5.0

    def __init__(self, address: tuple[str, int], health: Health):
        host, port = address
        if host != "localhost" and ipaddress.ip_address(host).version == 6:
            self.address_family = socket.AF_INET6
        self.health = health
        self._slots = threading.BoundedSemaphore(self.MAX_CLIENTS)
        self._serving: dict[socket.socket, float] = {}  # connection -> when it was accepted
        self._serving_lock = threading.Lock()
        super().__init__((host, port), _HealthHandler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("health server: %s turned away, %d clients already served", client_address[0],
                      self.MAX_CLIENTS)
            self._busy(request)
            return
        with self._serving_lock:
            self._serving[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def _busy(self, request: socket.socket) -> None:
        """A client past the cap is answered 503 at once, without a thread: what it sent so far is
        read first (closing on unread bytes would reset the connection before it reads this)."""
        body = json.dumps({"status": "unhealthy", "reasons": [
            f"the health server is busy ({self.MAX_CLIENTS} clients at once); try again"]}).encode() + b"\n"
        answer = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Cache-Control: no-store\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\nConnection: close\r\n\r\n" + body)
        with contextlib.suppress(OSError):
            select.select([request], [], [], 0.05)  # a request sent right after the connection
            request.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                request.recv(65536)
            request.send(answer)  # a few hundred bytes: the socket's buffer takes them at once
            request.shutdown(socket.SHUT_WR)
            with contextlib.suppress(BlockingIOError):
                request.recv(65536)
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._serving_lock:
            self._serving.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever between polls (every 0.5 s): connections past their time are
        shut, which ends their handler's read."""
        now = time.monotonic()
        with self._serving_lock:
            late = [request for request, accepted in self._serving.items()
                    if now - accepted > self.REQUEST_SECONDS]
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-request: a debug line, not a traceback on stderr."""
        log.debug("health server: a request from %s failed: %s", client_address[0],
                  describe(sys.exc_info()[1]))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}{HEALTH_PATH}"

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="health", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# 15. CLI: the commands beside the service (`register.py healthcheck`)
# ---------------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A health signal answers itself: a redirect is an answer that is not 200."""

    def redirect_request(self, *args, **kwargs):
        return None


def _ask(url: str, answer: dict) -> None:
    """GET `url` directly (never through a proxy, never redirected): answer["status"] and
    answer["data"] (at most HEALTH_BODY_LIMIT bytes), or answer["error"]."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    try:
        try:
            with opener.open(url, timeout=HEALTHCHECK_TIMEOUT) as response:
                answer["status"], answer["data"] = response.status, response.read(HEALTH_BODY_LIMIT)
        except urllib.error.HTTPError as exc:
            answer["status"], answer["data"] = exc.code, exc.read(HEALTH_BODY_LIMIT)
    except Exception as exc:  # whatever the other end did: one line, never a traceback
        answer["error"] = exc


def healthcheck(argv: list[str], environ: Mapping[str, str]) -> int:
    """`register.py healthcheck`: 0 when the service's /healthz says healthy, 1 when it does not
    or does not answer (Docker's HEALTHCHECK codes), 2 for a bad address; one line either way."""
    parser = _Parser(prog=f"{PROG} healthcheck", allow_abbrev=False,
                     description="Ask a running service's health server (GET /healthz) and exit 0 "
                                 "when it is healthy, 1 otherwise: for Docker's HEALTHCHECK and "
                                 "for operators.")
    setting = SETTING["REGISTER_HEALTH_ADDR"]
    setting.add_to(parser)
    try:
        address = setting_value(setting, getattr(parser.parse_args(argv), setting.env), environ)
        if address is None:
            raise ConfigError(f"{setting.env} is not set (nor {setting.flag}); expected the address "
                              f"the service's health server listens on, e.g. {setting.env}={setting.example}")
        host, port = address
    except ConfigError as exc:
        print(f"{PROG} healthcheck: error: {exc}", file=sys.stderr)
        return 2
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{HEALTH_PATH}"
    answer: dict = {}
    # the whole exchange on a thread of its own, given HEALTHCHECK_TIMEOUT in all: a socket
    # timeout bounds each read, not a server that drips its answer a line a second
    asking = threading.Thread(target=_ask, args=(url, answer), name="healthcheck", daemon=True)
    asking.start()
    asking.join(HEALTHCHECK_TIMEOUT)
    if asking.is_alive():
        print(f"unhealthy: no answer from {url} within {HEALTHCHECK_TIMEOUT:.0f} s")
        return 1
    if "error" in answer:
        exc = answer["error"]
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"unhealthy: no answer from {url}: "
              f"{describe(reason) if isinstance(reason, BaseException) else printable(reason)}")
        return 1
    status, data = answer["status"], answer["data"]
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = {}
    body = body if isinstance(body, dict) else {}
    if status == 200 and body.get("status") == "ok":
        print(f"healthy: Docker's events followed, etcd answered {body.get('etcd_answered_seconds_ago')} s "
              f"ago, last full reconcile {body.get('full_reconcile_seconds_ago')} s ago, "
              f"{body.get('records')} record(s)")
        return 0
    reasons = body.get("reasons") if isinstance(body, dict) else None
    said = "; ".join(map(str, reasons)) if isinstance(reasons, list) and reasons else printable(
        data.decode(errors="replace"), 200)
    print(f"unhealthy (HTTP {status}): {said}")
    return 1


# ---------------------------------------------------------------------------------------------
# 16. Main: the threads, signals and shutdown
# ---------------------------------------------------------------------------------------------

SHUTDOWN_SECONDS = 1.8  # SIGTERM to exit: within 2 s, whatever etcd and Docker are doing
DEREGISTER_SECONDS = 1.0  # of which the subtree deletion of --deregister-on-exit may take


def main(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["healthcheck"]:
        return healthcheck(argv[1:], environ)
    try:
        config = load_config(argv, environ)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        if not stop.is_set():
            log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    pool = ThreadPoolExecutor(Reconciler.WORKERS, thread_name_prefix="io")
    registry = make_registry(config, pool)
    engine = DockerEngine(config.docker_host)
    reconciler = Reconciler(config, registry, engine, stop, pool)
    user = f", user {config.etcd_username}" if config.etcd_username else ""
    log_event(logging.INFO,
              f"docker-etcd-register {VERSION}: host {config.host_ip}, etcd "
              f"{','.join(e.url for e in config.etcd_endpoints)} (v{config.etcd_api} API{user}), "
              f"subtree {config.host_dir}/, docker {config.docker_host}, ttl {config.ttl} s, "
              f"resync {config.resync} s",
              event="starting", host_ip=config.host_ip, prefix=config.prefix)
    for warning in host_ip_warnings(config.host_ip):
        log_event(logging.WARNING, warning, event="host_ip")
    if config.health_addr:
        try:
            server = HealthServer(config.health_addr, Health(config, reconciler.status, registry, engine))
        except OSError as exc:  # the port is taken, or the address is not this host's
            host, port = config.health_addr
            print(f"{PROG}: error: the health address {f'[{host}]' if ':' in host else host}:{port} "
                  f"(REGISTER_HEALTH_ADDR, --health-addr) cannot be listened on ({describe(exc)}); "
                  "expected a free port on an address of this host", file=sys.stderr)
            return 2
        server.start()
        log_event(logging.INFO, f"health signal at {server.url}", event="health_server", url=server.url)
    threads = [threading.Thread(target=reconciler.run, name="reconciler", daemon=True),
               threading.Thread(target=follow_events, args=(engine, reconciler, stop),
                                name="events", daemon=True)]
    if reconciler.heartbeat is not None:
        threads.append(threading.Thread(target=reconciler.heartbeat.run, name="heartbeat", daemon=True))
    for thread in threads:
        thread.start()
    stop.wait()

    deadline = time.monotonic() + SHUTDOWN_SECONDS
    registry.closed = config.deregister_on_exit  # no write may land after the subtree is deleted
    reconciler.wake()
    engine.close()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic() - (DEREGISTER_SECONDS
                                                            if config.deregister_on_exit else 0)))
    fatal = reconciler.status.snapshot().fatal
    if fatal:
        print(f"{PROG}: error: {fatal}", file=sys.stderr)
        return 2
    deleted = deregister(registry, deadline) if config.deregister_on_exit else False
    log.info("stopped; %d record(s) left in place", 0 if deleted else len(reconciler.known))
    return 0


def deregister(registry: Registry, deadline: float) -> bool:
    """Delete this host's subtree, giving up at the shutdown deadline (the TTL then takes it).
    True when it was deleted."""
    done = threading.Event()
    deleted = []

    def delete() -> None:
        try:
            if registry.clear():
                deleted.append(True)
                log.info("deleted %s/ (--deregister-on-exit)", registry.host_dir)
        except Unavailable as exc:
            log.error("could not delete %s/ on exit: %s; it expires with its TTL", registry.host_dir, exc)
        done.set()

    threading.Thread(target=delete, name="deregister", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        log.error("could not delete %s/ on exit: etcd did not answer in time; it expires with its TTL",
                  registry.host_dir)
    return bool(deleted)


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit now: an I/O thread may still wait on a stalled etcd or Docker, and the interpreter
    # would otherwise join it. Every record is one put, so nothing is left half-written.
    os._exit(status)
