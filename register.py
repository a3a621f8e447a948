#!/usr/bin/env python3
"""docker-etcd-register: keep etcd's ``<prefix>/<host-ip>/`` equal to this host's running containers.

One instance runs on every Docker host. It writes one key per running container that publishes
ports, ``<prefix>/<host-ip>/<image>/<container-id>``, whose value is a JSON array with one object
per published port, and deletes the keys of containers that are gone. The design is a
level-triggered reconciler: Docker events only say *which* container to look at; what gets written
is always computed from Docker's and etcd's current state, so lost, duplicated or reordered events
are harmless, and a periodic full reconcile repairs whatever drifted.

Sections, in reading order: configuration, logging, records (pure), retry schedule, registry
(etcd), engine (Docker), reconciler, main.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

import backoff
import docker
import docker.errors
import etcd
import requests
import urllib3

VERSION = "1.0.0"
PROG = "register.py"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
log = logging.getLogger("register")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

class ConfigError(Exception):
    """Bad configuration: reported as one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    default: str | None  # None: required; "": optional, unset by default
    expected: str  # what a good value looks like, in words
    example: str
    help: str


SETTINGS = (
    Setting("ETCD_ENDPOINT", "--etcd-endpoint", None,
            "host:port, http://host:port or https://host:port, or a comma-separated list of them",
            "http://127.0.0.1:2379",
            "etcd v2 API endpoint(s); a comma-separated list for a cluster; port defaults to 2379; "
            "IPv6 in brackets ([fd00::1]:2379). Required."),
    Setting("HOST_IP", "--host-ip", None,
            "this host's IPv4 or IPv6 address", "10.0.0.1",
            "this host's address, as other hosts reach it; the second level of every key. Required."),
    Setting("REGISTER_PREFIX", "--prefix", "/registered",
            "an absolute etcd path below the root, of letters, digits and . _ : @ - between slashes",
            "/registered", "the top of the registry tree"),
    Setting("DOCKER_HOST", "--docker-host", "",
            "unix:///path/to/docker.sock, tcp://host:port, or ssh://user@host with paramiko installed",
            "unix:///var/run/docker.sock",
            f"the Docker engine's address, as for the Docker CLI (default: {DEFAULT_DOCKER_HOST}); "
            "DOCKER_TLS_VERIFY and DOCKER_CERT_PATH apply as for the Docker CLI"),
    Setting("REGISTER_MAX_RECORD_BYTES", "--max-record-bytes", str(512 * 1024),
            "a whole number of bytes from 1024 up", str(512 * 1024),
            "the largest record value written; a container whose record would be larger (thousands "
            "of published ports) is not registered, with a warning"),
    Setting("REGISTER_TTL", "--ttl", "60",
            "0 (no TTL) or a whole number of seconds from 3 up", "60",
            "seconds the host directory outlives this service; refreshed every TTL/3; 0 turns it off"),
    Setting("REGISTER_RESYNC", "--resync", "60",
            "a whole number of seconds from 1 up", "60",
            "seconds between full reconciles (the safety net that repairs any drift)"),
    Setting("ETCD_CA_FILE", "--etcd-ca-file", "",
            "a readable PEM file", "/etc/ssl/etcd/ca.pem",
            "CA certificate(s) to verify etcd's server certificate with (https endpoints; the "
            "system's CAs by default)"),
    Setting("ETCD_CERT_FILE", "--etcd-cert-file", "",
            "a readable PEM file", "/etc/ssl/etcd/client.pem",
            "client certificate for etcd's client certificate authentication (with ETCD_KEY_FILE)"),
    Setting("ETCD_KEY_FILE", "--etcd-key-file", "",
            "a readable PEM file", "/etc/ssl/etcd/client-key.pem",
            "the client certificate's private key (with ETCD_CERT_FILE)"),
    Setting("LOG_LEVEL", "--log-level", "info",
            "debug, info, warning or error", "info", "log verbosity"),
    Setting("LOG_FORMAT", "--log-format", "text",
            "text or json", "json", "text, or json for one JSON object per line"),
)
SETTING = {s.env: s for s in SETTINGS}
DEFAULT_ETCD_PORT = 2379
MIN_TTL = 3
MIN_RECORD_BYTES = 1024
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
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


@dataclass(frozen=True)
class Config:
    etcd_endpoints: tuple[Endpoint, ...]
    host_ip: str
    prefix: str
    ttl: int
    resync: int
    log_level: str
    log_format: str
    deregister_on_exit: bool
    etcd_ca_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    docker_host: str = DEFAULT_DOCKER_HOST
    max_record_bytes: int = 512 * 1024

    @property
    def host_dir(self) -> str:
        return f"{self.prefix}/{self.host_ip}"


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
        address = address.ipv4_mapped  # one spelling whatever the interpreter (DESIGN.md, keys)
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


def parse_choice(choices: Iterable[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError("is not one of the choices")
        return text.lower()
    return parse


PARSERS: Mapping[str, Callable[[str], object]] = {
    "ETCD_ENDPOINT": parse_endpoints,
    "HOST_IP": parse_host_ip,
    "REGISTER_PREFIX": parse_prefix,
    "DOCKER_HOST": parse_docker_host,
    "REGISTER_MAX_RECORD_BYTES": lambda text: parse_bytes(text, MIN_RECORD_BYTES),
    "REGISTER_TTL": lambda text: parse_seconds(text, MIN_TTL, allow_zero=True),
    "REGISTER_RESYNC": lambda text: parse_seconds(text, 1, allow_zero=False),
    "ETCD_CA_FILE": parse_file,
    "ETCD_CERT_FILE": parse_file,
    "ETCD_KEY_FILE": parse_file,
    "LOG_LEVEL": parse_choice(LOG_LEVELS),
    "LOG_FORMAT": parse_choice(("text", "json")),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, as for every other bad configuration
        raise ConfigError(mask_message(message))


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Register this host's running containers and their published ports in etcd "
                    "(v2 API) under <prefix>/<host-ip>/<image>/<container-id>, and keep them equal "
                    "to the truth. Every setting is an environment variable and a flag; the flag "
                    "wins. Docker is reached as the Docker CLI does (DOCKER_HOST, DOCKER_TLS_VERIFY, "
                    "DOCKER_CERT_PATH; the local socket by default).")
    for s in SETTINGS:
        default = f" (default: {s.default})" if s.default else ""
        parser.add_argument(s.flag, dest=s.env, metavar=s.env, default=None,
                            help=f"{s.help} [env {s.env}]{default}")
    parser.add_argument("--deregister-on-exit", action="store_true",
                        help="on SIGTERM/SIGINT delete this host's subtree before exiting "
                             "(by default records stay, so a restart makes nothing flap)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    return parser


def load_config(argv: list[str] | None, environ: Mapping[str, str]) -> Config:
    """Settings from flags, then the environment, then defaults; each one validated."""
    args = build_arg_parser().parse_args(argv)
    values = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.env)
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
                values[s.env] = None
                continue
            raise ConfigError(f"{source} is empty; expected {s.expected}, e.g. {source}={s.example}")
        try:
            values[s.env] = PARSERS[s.env](text.strip())
        except ValueError as exc:
            raise _problem(s, source, text, str(exc)) from None
    _check_tls(values)
    _check_docker_tls(values["DOCKER_HOST"], environ)
    return Config(
        etcd_endpoints=values["ETCD_ENDPOINT"], host_ip=values["HOST_IP"],
        prefix=values["REGISTER_PREFIX"], ttl=values["REGISTER_TTL"],
        resync=values["REGISTER_RESYNC"], log_level=values["LOG_LEVEL"],
        log_format=values["LOG_FORMAT"], deregister_on_exit=args.deregister_on_exit,
        etcd_ca_file=values["ETCD_CA_FILE"], etcd_cert_file=values["ETCD_CERT_FILE"],
        etcd_key_file=values["ETCD_KEY_FILE"],
        docker_host=values["DOCKER_HOST"] or DEFAULT_DOCKER_HOST,
        max_record_bytes=values["REGISTER_MAX_RECORD_BYTES"])


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


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

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
# Records: pure functions from `docker inspect` data to a key and a value. No I/O.
# ---------------------------------------------------------------------------------------------

class RecordError(ValueError):
    """Docker reported data that cannot be turned into records."""


class Entry(NamedTuple):
    """What one container contributes to the registry: one key, one value."""
    container_id: str
    name: str
    image: str  # as Docker reports it (Config.Image), for logs
    key: str
    value: str
    ports: str  # for logs: 80/tcp=10.0.0.1:49153,...


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
    """The key and value a container should have; None when it is not running or publishes nothing.

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
    if not is_running(inspect):
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
                 f"{prefix}/{host_ip}/{image_part}/{container_id}", value, ports_summary(records))


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
                "Config": {"Image": image}, "HostConfig": {"NetworkMode": mode},
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
# Retry schedule
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

    def remaining(self) -> float:
        return max(0.0, self._due - time.monotonic())


# ---------------------------------------------------------------------------------------------
# Registry: the etcd v2 adapter. It knows this host's subtree and nothing of Docker.
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


class HostDirReplaced(RegistryUnavailable):
    """A write found a plain value in the host directory's place and replaced it (said once,
    where it was replaced): everything is to be registered again, at once."""


class RecordRefused(Exception):
    """etcd answered, and refused this one write (too large, not permitted): the other records
    are not held back by it, and it is retried on its own."""


class Subtree(NamedTuple):
    leaves: dict  # key -> value
    dirs: set  # every directory below the host directory


class HostScope:
    """This host's part of the keyspace, and the one place that says what may be changed.

    Every write, refresh and delete of a registry adapter names its key through `check`, which
    passes only `<prefix>/<HOST_IP>` itself (where asked for) and keys below it without an empty,
    `.` or `..` segment (etcd resolves them, so `<host dir>/../x` would land outside), and returns
    the key as it goes into a URL (python-etcd puts keys into URLs as they are). The keys this
    service makes hold only key characters; a key found in etcd below the host directory may hold
    any (an operator's `foo bar`): it is escaped, so that exactly that key is deleted.
    """

    def __init__(self, prefix: str, host_ip: str):
        self.prefix = prefix
        self.host_dir = f"{prefix}/{host_ip}"
        if not self._clean(self.host_dir[1:]):
            raise OutsideScope(f"{self.host_dir!r} is not a clean etcd path")

    @staticmethod
    def _clean(path: str, found: bool = False) -> bool:
        """No empty, `.` or `..` segment; only key characters unless `found`."""
        return all(segment not in ("", ".", "..") and (found or KEY_SEGMENT_RE.fullmatch(segment))
                   for segment in path.split("/"))

    def check(self, key: str, host_dir: bool = False, found: bool = False) -> str:
        """The URL form of `key` when it is this host's to change; raises OutsideScope otherwise.
        `found`: a key read from etcd below the host directory, which may hold any character."""
        if key == self.host_dir:
            if host_dir:
                return key
        elif key.startswith(self.host_dir + "/") and self._clean(key[len(self.host_dir) + 1:], found):
            return urllib.parse.quote(key, safe="/:@+")
        raise OutsideScope(f"refusing to change {printable(key)}: not a clean key inside {self.host_dir}/")

    def ancestors(self, key: str) -> list[str]:
        """Every directory above `key`, from the top: /a, /a/b, ..."""
        parts = key.split("/")[1:-1]
        return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


class OutsideScope(AssertionError):
    """A write outside this host's subtree was attempted, and refused before any request."""


class EtcdRegistry:
    """Reads and writes this host's subtree only; every write goes through HostScope.check."""

    TIMEOUT = 5  # seconds for one request: a stalled etcd must not stall the service
    POOL = 16

    def __init__(self, config: Config):
        self.endpoints = config.etcd_endpoints
        self._ca_file = config.etcd_ca_file
        self._cert = (config.etcd_cert_file, config.etcd_key_file) if config.etcd_cert_file else None
        self.scope = HostScope(config.prefix, config.host_ip)
        self.host_dir = self.scope.host_dir
        self.ttl = config.ttl
        self._client: etcd.Client | None = None
        self._current = 0
        self._lock = threading.Lock()
        self._dir_ready = False
        self.closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._current % len(self.endpoints)]

    def _connection(self) -> etcd.Client:
        # One client per endpoint, rebuilt after any connection failure: python-etcd gives up on
        # a server list for good once every member failed, and this service must never give up.
        with self._lock:
            if self._client is None:
                ep = self.endpoint
                self._client = etcd.Client(host=ep.host, port=ep.port, protocol=ep.protocol,
                                           read_timeout=self.TIMEOUT, allow_reconnect=False,
                                           per_host_pool_size=self.POOL, cert=self._cert,
                                           ca_cert=self._ca_file)
                # urllib3 would retry each request three more times on its own (4 x TIMEOUT
                # against a stalled etcd); retries are this service's, with backoff and a log line.
                self._client.http.connection_pool_kw["retries"] = urllib3.Retry(0)
            return self._client

    def _call(self, operation: Callable[[etcd.Client], object], key: str, record: bool = False):
        """One request about `key`. etcd's refusals (HTTP 4xx) of a record write concern that
        record alone (RecordRefused); of anything else, every write here (RegistryBlocked)."""
        client = self._connection()
        try:
            return operation(client)
        except (etcd.EtcdKeyError, etcd.EtcdCompareFailed, etcd.EtcdDirNotEmpty):
            raise  # the key's state, handled by the caller
        except etcd.EtcdException as exc:
            status = exc.payload.get("status") if isinstance(exc.payload, dict) else None
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                reason = f"{describe(exc)} (HTTP {status})"
                if record:  # "Invalid POST form : http: POST too large": another record may pass
                    raise RecordRefused(f"etcd refused it: {reason}") from exc
                raise RegistryBlocked(
                    f"etcd refused a request for {printable(key)}: {reason}; an operator should check "
                    f"what etcd lets this client do under {self.scope.prefix}/ (permissions, "
                    "limits)") from exc
            self._failed(client)
            raise RegistryUnavailable(f"etcd at {client.base_uri} failed: {describe(exc)}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            self._failed(client)
            raise RegistryUnavailable(f"etcd at {client.base_uri} failed: {describe(exc)}") from exc

    def _failed(self, client: etcd.Client) -> None:
        with self._lock:
            if self._client is client:  # the first thread to see the failure moves on
                self._client = None
                self._current += 1
            self._dir_ready = False  # after any error, ensure the directory before writing

    def _write(self, key: str, operation: Callable[[etcd.Client, str], object], host_dir: bool = False,
               final: bool = False, found: bool = False, record: bool = False):
        """Every change to etcd goes through here: the key is checked, then the operation runs
        with exactly the key checked. Once the service is stopping only the final deregistration
        runs."""
        checked = self.scope.check(key, host_dir=host_dir, found=found)
        if self.closed and not final:
            raise RegistryUnavailable("the service is stopping")
        return self._call(lambda c: operation(c, checked), key, record=record)

    # -- the host directory ----------------------------------------------------------------

    def ensure_host_dir(self) -> bool:
        """Make sure the host directory exists, with its TTL, before any child is written.

        etcd v2 creates missing parents without a TTL, which would silently remove the safety net.
        Returns True when the directory was missing or had lost its TTL: whatever was under it
        cannot be trusted, and a full reconcile must follow.
        """
        if self._dir_ready:
            return False
        repaired = self._ensure_ttl_dir() if self.ttl else self._ensure_no_ttl()
        self._dir_ready = True
        return repaired

    def _ensure_ttl_dir(self) -> bool:
        for _ in range(3):  # the directory may expire, or an operator act, between two requests
            try:
                self._write(self.host_dir, lambda c, k: c.write(k, None, dir=True, ttl=self.ttl,
                                                                prevExist=False), host_dir=True)
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
        self._dir_ready = False
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

    def refresh(self) -> str | None:
        """Extend the host directory's TTL with one write that wakes no watcher.

        Returns None when it was there, or what had happened to it: gone (expired or wiped), its
        TTL lost (re-created by a child write), or replaced by a plain value (which etcd refreshes
        like a directory, and which is removed here). Then the caller must re-register everything.
        """
        try:
            result = self._write(self.host_dir, lambda c, k: c.write(
                k, None, dir=True, ttl=self.ttl, refresh=True, prevExist=True), host_dir=True)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir, etcd.EtcdNotFile):
            self._dir_ready = False
            return "had expired or lost its TTL"
        previous = getattr(result, "_prev_node", None)
        if previous is not None and not previous.dir:
            self._replace_plain_host_value(say=False)  # the caller says it, with what follows
            return "had been replaced by a plain value, now removed"
        if previous is None or previous.ttl is None:
            self._dir_ready = False
            return "had expired or lost its TTL"
        return None

    # -- records ----------------------------------------------------------------------------

    def read_subtree(self) -> Subtree:
        try:
            top = self._call(lambda c: c.read(self.host_dir, recursive=True), self.host_dir)
        except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir):
            return Subtree({}, set())
        if not top.dir:  # a plain value in the directory's place: ensure_host_dir replaces it
            self._dir_ready = False
            return Subtree({}, set())
        leaves, dirs = {}, set()
        for node in top.get_subtree():
            if node.key == self.host_dir:
                continue
            if node.dir:
                dirs.add(node.key)
            else:
                leaves[node.key] = node.value
        return Subtree(leaves, dirs)

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
                    raise HostDirReplaced(f"etcd: {self.host_dir} was a plain value") from None
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

    def prune_after_delete(self, key: str) -> None:
        image_dir = key.rsplit("/", 1)[0]
        if image_dir != self.host_dir:
            self.prune(image_dir)
        self.prune_host_dir()

    def prune_host_dir(self) -> None:
        """With REGISTER_TTL=0 an empty host directory goes; with a TTL it stays, as a heartbeat."""
        if not self.ttl:
            self.prune(self.host_dir)
            self._dir_ready = False

    def delete_host_subtree(self) -> None:
        with contextlib.suppress(etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
            self._write(self.host_dir, lambda c, k: c.delete(k, recursive=True, dir=True),
                        host_dir=True, final=True)


# ---------------------------------------------------------------------------------------------
# Engine: the Docker adapter. It knows containers and events and nothing of etcd.
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

    def running(self) -> list[dict]:
        """The container list (running and paused ones): one request for all of them."""
        try:
            return self._client().containers()
        except (requests.exceptions.RequestException, docker.errors.APIError) as exc:
            raise self._unavailable(exc) from exc

    def inspect(self, container_id: str) -> dict | None:
        """The container's inspect data; None when it no longer exists."""
        try:
            return self._client().inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        except requests.exceptions.RequestException as exc:
            raise self._unavailable(exc) from exc

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
# Reconciler: desired state (Docker) against actual state (etcd)
# ---------------------------------------------------------------------------------------------

UNKNOWN = object()  # a container Docker failed to describe this time: leave its record as it is


def removal_reason(running: bool) -> str:
    return "container no longer runs or publishes a port" if running else "container stopped or gone"


class Refusal(NamedTuple):
    schedule: RetrySchedule
    due: float  # time.monotonic() of the next attempt
    reason: str
    armed: bool = False  # `due` was set when this attempt was taken: a new refusal keeps it


REFUSED_RETRY_CAP = 300.0  # seconds: a refused record is retried at least this often


class Reconciler:
    """Keeps the host subtree equal to the running containers.

    A single worker thread does all writing. Events only mark containers dirty (one entry per
    container, so bursts coalesce and memory stays bounded); a full reconcile runs on start, on
    every reconnect to Docker, when the host directory was lost, after an etcd failure, and every
    `resync` seconds.
    """

    MAX_DIRTY = 10_000  # beyond this, one full reconcile is cheaper than tracking each container
    WORKERS = 8

    def __init__(self, config: Config, registry: EtcdRegistry, engine: DockerEngine,
                 stop: threading.Event):
        self.config = config
        self.registry = registry
        self.engine = engine
        self.stop = stop
        self._cond = threading.Condition()
        # container id -> whether its latest event said it stopped (die, destroy): a dict, so
        # bursts coalesce per container and memory stays bounded
        self._dirty: dict[str, bool] = {}
        self._full_reasons: dict[str, None] = {}  # why a full reconcile is due (an ordered set)
        self._events_connected = False
        self._refresh_suspended = False  # Docker is unreachable: this host's records are unvouched
        self._suspension_said = False
        # containers whose latest event said they stopped, while Docker's list may still show them
        # running (it lags behind the event by the teardown): the list is not trusted for them
        self._stopped_lately: set[str] = set()
        # containers known to run (their latest event was a start, or the container list shows
        # them) -> since when: network events matter only to these
        self._running: dict[str, float] = {}
        self.known: dict[str, Entry] = {}  # container id -> entry known to be in etcd
        self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="io")
        self._resync = Timer(config.resync, due_now=False)
        self._refresh = Timer(config.ttl / 3, due_now=False) if config.ttl else None
        self._failures = RetrySchedule()
        self._down: str | None = None  # what failed last, until it works again
        self._error_said = 0.0  # when an error that waits for an operator was last logged
        self.full_reconciles = 0
        # containers whose record etcd refused: retried alone, with a backoff of their own
        self._refused: dict[str, Refusal] = {}
        # the last warning about each container that is not registered (odd data, too large): said
        # once, not at every resync; forgotten with the container
        self._warned: dict[str, str] = {}

    # -- inputs from other threads -----------------------------------------------------------

    def mark_dirty(self, container_id: str, stopped: bool | None = False) -> None:
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
                self._full_reasons.setdefault(f"more than {self.MAX_DIRTY} containers pending")
            else:
                self._dirty.pop(container_id, None)  # keep the order of the latest events
                self._dirty[container_id] = stopped
            if not stopped:
                self._stopped_lately.discard(container_id)
            elif len(self._stopped_lately) < self.MAX_DIRTY:
                self._stopped_lately.add(container_id)
            self._cond.notify()

    def set_events_connected(self, connected: bool) -> None:
        with self._cond:
            self._events_connected = connected
            if connected:
                self._full_reasons.setdefault("connected to Docker's event stream")
                self._refresh_suspended = False
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._step()
            except HostDirReplaced:
                self._note_full(f"host directory {self.registry.host_dir} was (re)created")
            except Unavailable as exc:
                if isinstance(exc, RegistryUnavailable):
                    # A request that timed out may still have been applied, and etcd may have been
                    # wiped or restored meanwhile: what it holds is read again before any write.
                    self._note_full("etcd failed: re-reading what it holds")
                blocked = isinstance(exc, RegistryBlocked)  # an operator must act: an error
                self._back_off(str(exc), logging.ERROR if blocked else logging.WARNING)
            except Exception as exc:  # a bug: log it whole, keep serving
                log.exception("unexpected error in the reconciler: %s", exc)
                self._back_off(f"unexpected error: {exc}")
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _back_off(self, cause: str, level: int = logging.WARNING) -> None:
        delay = self._failures.next_delay()
        if level >= logging.ERROR:  # waits for an operator: said again once a minute, not per retry
            now = time.monotonic()
            if cause == self._down and now - self._error_said < 60:
                level = logging.DEBUG
            else:
                self._error_said = now
        with self._cond:
            pending = len(self._dirty)
        log_event(level,
                  f"{cause}; {pending} container(s) pending; retrying in {delay:.1f} s",
                  event="retry", cause=cause, retry_in=round(delay, 3), pending=pending)
        self._down = cause
        self.stop.wait(delay)

    def _recovered(self) -> None:
        if self._down is not None:
            log_event(logging.INFO, f"recovered after {self._failures.failures} failed attempt(s); "
                      f"last cause: {self._down}", event="recovered")
            self._down = None
        self._failures.reset()

    def _step(self) -> None:
        if self.registry.ensure_host_dir():
            self._note_full(f"host directory {self.registry.host_dir} was (re)created")
        if self._refresh is not None and self._refresh.due() and self._vouch_for_records():
            lost = self.registry.refresh()
            if lost:
                log_event(logging.WARNING, f"host directory {self.registry.host_dir} {lost}; "
                          "re-registering everything", event="host_dir_lost")
                self.registry.ensure_host_dir()
                self._note_full("host directory had expired")
            self._refresh.restart()
        full, dirty = self._take_work()
        if full is not None:
            self._full_reconcile(full, dirty)
        elif dirty:
            self._sync(dirty)
        self._recovered()
        if full is None and not dirty:
            self._wait_for_work()

    def _vouch_for_records(self) -> bool:
        """The TTL is refreshed only while Docker's event stream is connected.

        Without Docker nobody can tell which containers still run (without live-restore they all
        died with dockerd), so the records are left to expire with the host directory's TTL
        instead of being kept alive blind. A refresh is due as soon as the stream is back.
        """
        with self._cond:
            connected = self._events_connected
            suspending = not connected and not self._refresh_suspended
            if suspending:
                self._refresh_suspended = True
            # said once per outage, also when a stream that Docker closes at once comes and goes
            warn = suspending and not self._suspension_said
            self._suspension_said = not connected and (self._suspension_said or suspending)
        if warn:
            log_event(logging.WARNING, f"Docker is unreachable: no longer refreshing the TTL of "
                      f"{self.registry.host_dir}; its records expire within {self.config.ttl} s "
                      "unless Docker returns", event="refresh_suspended")
        return connected

    def _note_full(self, reason: str) -> None:
        with self._cond:
            self._full_reasons.setdefault(reason)

    def _take_work(self):
        """(reasons for a full reconcile or None, dirty ids); Docker work only while connected."""
        with self._cond:
            if not self._events_connected:
                return None, {}
            if self._resync.due():
                self._full_reasons.setdefault("periodic resync")
            now = time.monotonic()
            for container_id, refusal in self._refused.items():
                if refusal.due <= now:  # its turn; the next one is armed now, whatever comes of it
                    self._dirty.setdefault(container_id, False)
                    self._refused[container_id] = refusal._replace(
                        due=now + refusal.schedule.next_delay(), armed=True)
            dirty, self._dirty = self._dirty, {}
            if self._full_reasons:  # it looks at every container, and at these events
                reasons, self._full_reasons = list(self._full_reasons), {}
                return reasons, dirty
            return None, dirty

    def _wait_for_work(self) -> None:
        with self._cond:
            # Docker work waits for Docker: while the event stream is down, pending containers and
            # full reconciles are no reason to run (set_events_connected wakes this thread)
            if self.stop.is_set() or (self._events_connected and (self._dirty or self._full_reasons)):
                return
            deadlines = []
            if self._events_connected:
                deadlines.append(self._resync.remaining())
            if self._refresh is not None and (self._events_connected or not self._refresh_suspended):
                deadlines.append(self._refresh.remaining())  # see _vouch_for_records
            if self._events_connected and self._refused:
                now = time.monotonic()
                deadlines.append(max(0.0, min(r.due for r in self._refused.values()) - now))
            self._cond.wait(min(deadlines) if deadlines else None)

    # -- desired state ---------------------------------------------------------------------

    def _desired(self, container_id: str, stopped: bool = False, listed: dict | None = None):
        """Entry, None (no record wanted) or UNKNOWN (its record is left as it is this time:
        Docker could not tell, or etcd refused the record and its next attempt is not due).

        A container whose latest event says it stopped wants no record, and is not inspected:
        Docker answers an inspect only once it has torn the container's network down (about
        0.1 s), and the record must go at once. A start event after it would say otherwise.
        `listed` is what the container list told (inspect_from_summary), when it could.
        """
        if stopped:
            return None
        if self._refusal_pending(container_id):  # etcd refused its record: it waits for its turn
            return UNKNOWN
        inspect = listed
        if inspect is None:
            try:
                inspect = self.engine.inspect(container_id)
            except docker.errors.APIError as exc:
                log_event(logging.WARNING, f"skipping container {container_id[:12]}: inspect failed: "
                          f"{describe(exc)}; its record is left as it is until the next resync",
                          event="skipped", id=container_id[:12])
                return UNKNOWN
            if inspect is None:
                return None
        try:
            return desired_entry(inspect, self.config.host_ip, self.config.prefix,
                                 self.config.max_record_bytes)
        except RecordError as exc:
            what = "not registered" if isinstance(exc, RecordTooLarge) else "treated as publishing nothing"
            self._warn_once(container_id, f"container {container_name(inspect)} ({container_id[:12]}) "
                            f"{what}: {exc}", event="bad_container", container=container_name(inspect),
                            id=container_id[:12], cause=str(exc))
            return None

    def _warn_once(self, container_id: str, message: str, **fields) -> None:
        """A warning about a container, said again only when it changes."""
        with self._cond:
            if self._warned.get(container_id) == message:
                return
            self._warned[container_id] = message
        log_event(logging.WARNING, message, **fields)

    def _desired_all(self, container_ids: Iterable[str], stopped: Iterable[bool] = (),
                     listed: Iterable[dict | None] = ()) -> dict:
        ids = list(container_ids)
        flags = list(stopped) or [False] * len(ids)
        known = list(listed) or [None] * len(ids)
        return dict(zip(ids, self._map(self._desired, ids, flags, known)))

    def _map(self, function: Callable, *iterables) -> list:
        """On the I/O pool; a single item on this thread, saving the hand-offs for one event."""
        columns = [list(iterable) for iterable in iterables]
        if len(columns[0]) <= 1:
            return list(map(function, *columns))
        return list(self._pool.map(function, *columns))

    # -- applying --------------------------------------------------------------------------

    def _register(self, entry: Entry, previous: Entry | None) -> None:
        try:
            self.registry.put(entry.key, entry.value)
        except RecordRefused as exc:
            self._refusal(entry, exc)
            raise
        with self._cond:
            self._refused.pop(entry.container_id, None)
        verb = "registered" if previous is None or previous.key != entry.key else "updated"
        log_event(logging.INFO, f"{verb} {entry.name} ({entry.container_id[:12]}) image {entry.image} "
                  f"ports {entry.ports}", event=verb, container=entry.name,
                  id=entry.container_id[:12], image=entry.image, ports=entry.ports, key=entry.key)

    def _refusal(self, entry: Entry, exc: RecordRefused) -> None:
        """etcd refused this container's record: it is retried alone, with a backoff of its own;
        said once (and again if the reason changes), not at every attempt."""
        with self._cond:
            previous = self._refused.get(entry.container_id)
            schedule = previous.schedule if previous else RetrySchedule(cap=REFUSED_RETRY_CAP)
            armed = previous is not None and previous.armed  # the next attempt is set already
            due = previous.due if armed else time.monotonic() + schedule.next_delay()
            delay = max(0.0, due - time.monotonic())
            self._refused[entry.container_id] = Refusal(schedule, due, str(exc))
            self._cond.notify()
        first = previous is None or previous.reason != str(exc)
        log_event(logging.WARNING if first else logging.DEBUG,
                  f"could not register {entry.name} ({entry.container_id[:12]}) image {entry.image}: "
                  f"{exc}; retrying this container alone in {delay:.1f} s (backoff up to "
                  f"{REFUSED_RETRY_CAP:.0f} s), the others are not held back", event="refused",
                  container=entry.name, id=entry.container_id[:12], image=entry.image, cause=str(exc),
                  retry_in=round(delay, 3), key=entry.key)

    def _refusal_pending(self, container_id: str) -> bool:
        with self._cond:
            refusal = self._refused.get(container_id)  # an armed one is being tried right now
            return refusal is not None and not refusal.armed and refusal.due > time.monotonic()

    def _forget(self, container_ids: Iterable[str]) -> None:
        """Containers that no longer run: nothing to retry or to warn about for them."""
        with self._cond:
            for container_id in container_ids:
                self._refused.pop(container_id, None)
                self._warned.pop(container_id, None)

    def _unregister(self, entry: Entry, why: str, prune: bool = True) -> None:
        self.registry.delete(entry.key)
        log_event(logging.INFO, f"removed {entry.name} ({entry.container_id[:12]}) image {entry.image} "
                  f"ports {entry.ports}: {why}", event="removed", container=entry.name,
                  id=entry.container_id[:12], image=entry.image, ports=entry.ports, key=entry.key)
        if prune:  # a full reconcile prunes every emptied directory itself
            self.registry.prune_after_delete(entry.key)

    def _converge_one(self, container_id: str, want, stopped: bool = True) -> None:
        """Make one container's key right, given what is known to be in etcd."""
        if want is UNKNOWN:
            return
        if want is None:  # nothing to write: nothing to retry
            with self._cond:
                self._refused.pop(container_id, None)
        have = self.known.get(container_id)
        if want is not None:
            if have is None or (have.key, have.value) != (want.key, want.value):
                self._register(want, have)
            self.known[container_id] = want
        if have is not None and (want is None or have.key != want.key):
            self._unregister(have, removal_reason(not stopped) if want is None else "key changed")
            if want is None:
                self.known.pop(container_id, None)

    def _sync(self, dirty: dict[str, bool]) -> None:
        """Bring the dirty containers' keys in line: removals first, then writes. A record etcd
        refuses is retried alone (see _refusal); on any other failure the containers that failed
        stay dirty."""
        try:
            wanted = self._desired_all(dirty, dirty.values())
        except Exception:  # Docker failed: every one of them stays dirty
            self._requeue(dirty)
            raise
        self._forget([cid for cid, stopped in dirty.items() if stopped])
        failures = []

        def converge(item):
            try:
                self._converge_one(*item, stopped=dirty[item[0]])
            except RecordRefused:
                pass  # said and scheduled where it was refused
            except Exception as exc:
                failures.append((item[0], exc))

        self._map(converge, [item for item in wanted.items() if item[1] is None])
        self._map(converge, [item for item in wanted.items() if item[1] is not None])
        if failures:
            self._requeue({cid: dirty[cid] for cid, _ in failures})
            raise failures[0][1]

    def _requeue(self, dirty: dict[str, bool]) -> None:
        with self._cond:
            for container_id, stopped in dirty.items():
                self._dirty.setdefault(container_id, stopped)  # a newer event knows better

    def _full_reconcile(self, reasons: list[str], dirty: dict[str, bool]) -> None:
        try:
            self._full_reconcile_once(reasons, dirty)
        except Exception:
            with self._cond:
                self._full_reasons.update(dict.fromkeys(reasons))
            self._requeue(dirty)
            raise
        self._resync.restart()

    def _full_reconcile_once(self, reasons: list[str], dirty: dict[str, bool]) -> None:
        """Every running container against the whole subtree.

        `dirty` are the events taken with it: Docker sends `die` before its container list stops
        showing the container as running, so the latest event of a container wins over the list,
        a container that stopped lately is inspected (the inspect waits for the teardown), and a
        container that started but is not listed yet is inspected too.
        """
        started = time.monotonic()
        with self._cond:
            lately = set(self._stopped_lately)
        listed = {c["Id"]: None if c["Id"] in lately else inspect_from_summary(c)
                  for c in self.engine.running()}
        with self._cond:  # those the list no longer shows: it has caught up with their events
            self._stopped_lately &= listed.keys() | (self._stopped_lately - lately)
            for container_id in listed.keys() - lately:
                self._running.setdefault(container_id, started)
            for container_id, since in list(self._running.items()):
                if container_id not in listed and since < started:  # stopped unseen, or gone
                    del self._running[container_id]
        ids = [*listed, *(cid for cid, stopped in dirty.items() if cid not in listed and not stopped)]
        with self._cond:
            gone = (self._refused.keys() | self._warned.keys()) - set(ids)
        self._forget(gone)
        wanted = self._desired_all(ids, [dirty.get(cid, False) for cid in ids],
                                   [listed.get(cid) for cid in ids])
        desired = {entry.key: entry for entry in wanted.values() if isinstance(entry, Entry)}
        unknown = {cid for cid, entry in wanted.items() if entry is UNKNOWN}
        actual = self.registry.read_subtree()

        previous, known = self.known, {}
        for key, value in actual.leaves.items():  # records already right are left untouched
            entry = desired.get(key)
            if entry is not None and entry.value == value:
                known[entry.container_id] = entry
        self.known = known
        changed = [entry for key, entry in desired.items() if key not in actual.leaves
                   or actual.leaves[key] != entry.value]
        # a record etcd refused waits for its own retry, so that it costs nothing meanwhile
        puts = [entry for entry in changed if not self._refusal_pending(entry.container_id)]
        stale = [key for key in actual.leaves
                 if key not in desired and key_container_id(key) not in unknown]
        refused = []

        def put(entry: Entry) -> None:
            try:
                self._register(entry, entry if entry.key in actual.leaves else None)
            except RecordRefused:
                refused.append(entry.key)
                return
            self.known[entry.container_id] = entry

        def delete(key: str) -> None:
            entry = previous.get(key_container_id(key))
            if entry is not None and entry.key == key:  # its removal was pending: say what it was
                self._unregister(entry, removal_reason(entry.container_id in listed), prune=False)
                return
            self.registry.delete(key)
            log_event(logging.INFO, f"removed stale {describe_record(key, actual.leaves[key])}: "
                      "no such running container", event="removed", key=key)

        # Removals first: a write that fails must never keep a dead container advertised.
        self._map(delete, stale)
        self._map(put, puts)
        # Directories holding no wanted record go: image directories left empty, and anything
        # deeper than a record (which no version of this service writes).
        keep = {key.rsplit("/", 1)[0] for key in desired}
        keep |= {key.rsplit("/", 1)[0] for key in actual.leaves if key_container_id(key) in unknown}
        doomed = actual.dirs - keep - desired.keys()  # a directory at a record's key was replaced
        for directory in doomed:
            if directory.rsplit("/", 1)[0] not in doomed:  # its parent's deletion takes it along
                self.registry.delete_tree(directory)
        if not desired and not unknown:
            self.registry.prune_host_dir()
        self.full_reconciles += 1
        routine = reasons == ["periodic resync"] and not puts and not stale
        written = len(puts) - len(refused)
        with self._cond:  # refused earlier, not due yet: left as they are (UNKNOWN) this time
            held = sum(1 for cid in unknown if cid in self._refused)
        waiting = len(changed) - written + held
        log_event(logging.DEBUG if routine else logging.INFO,
                  f"full reconcile ({', '.join(reasons)}): {len(desired) + held} record(s), "
                  f"{written} written, {len(stale)} removed, {len(desired) - len(changed)} already right, "
                  + (f"{waiting} refused by etcd and retried alone, " if waiting else "")
                  + f"in {time.monotonic() - started:.2f} s",
                  event="reconciled", records=len(desired) + held, written=written, removed=len(stale),
                  refused=waiting)


# ---------------------------------------------------------------------------------------------
# Event stream
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
# Main
# ---------------------------------------------------------------------------------------------

SHUTDOWN_SECONDS = 1.8  # SIGTERM to exit: within 2 s, whatever etcd and Docker are doing
DEREGISTER_SECONDS = 1.0  # of which the subtree deletion of --deregister-on-exit may take


def main(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
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

    registry = EtcdRegistry(config)
    engine = DockerEngine(config.docker_host)
    reconciler = Reconciler(config, registry, engine, stop)
    log_event(logging.INFO,
              f"docker-etcd-register {VERSION}: host {config.host_ip}, etcd "
              f"{','.join(e.url for e in config.etcd_endpoints)}, subtree {config.host_dir}/, "
              f"docker {config.docker_host}, ttl {config.ttl} s, resync {config.resync} s",
              event="starting", host_ip=config.host_ip, prefix=config.prefix)
    for warning in host_ip_warnings(config.host_ip):
        log_event(logging.WARNING, warning, event="host_ip")
    threads = [threading.Thread(target=reconciler.run, name="reconciler", daemon=True),
               threading.Thread(target=follow_events, args=(engine, reconciler, stop),
                                name="events", daemon=True)]
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
    if config.deregister_on_exit:
        deregister(registry, deadline)
    log.info("stopped; %d record(s) left in place", 0 if config.deregister_on_exit
             else len(reconciler.known))
    return 0


def deregister(registry: EtcdRegistry, deadline: float) -> None:
    """Delete this host's subtree, giving up at the shutdown deadline (the TTL then takes it)."""
    done = threading.Event()

    def delete() -> None:
        try:
            registry.delete_host_subtree()
            log.info("deleted %s/ (--deregister-on-exit)", registry.host_dir)
        except Unavailable as exc:
            log.error("could not delete %s/ on exit: %s; it expires with its TTL", registry.host_dir, exc)
        done.set()

    threading.Thread(target=delete, name="deregister", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        log.error("could not delete %s/ on exit: etcd did not answer in time; it expires with its TTL",
                  registry.host_dir)


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit now: an I/O thread may still wait on a stalled etcd or Docker, and the interpreter
    # would otherwise join it. Every record is one put, so nothing is left half-written.
    os._exit(status)
