"""The registry invariant, checked against the truth: one checker for every fault test.

After any fault heals, `<prefix>/<HOST_IP>/` holds exactly one correct record per running
container that publishes a port, and nothing else; the host directory carries its TTL; other
hosts' subtrees (and other prefixes) are untouched, down to their modifiedIndex.

The truth comes from `docker ps` and `docker inspect` through the docker CLI, and the expected
records are computed here from the contract in docs/architecture.md ("The registry contract"),
independently of register.py:
a test oracle that shares no code with the service it checks.
"""
from __future__ import annotations

import ipaddress
import json
import re
import time

import etcd
from store import Store
from testbed import DockerEngine, Registrar, read_tree

# Convergence times measured by the fault tests: (fault, seconds), printed at the end of the
# session by conftest.py.
MEASURED: list[tuple[str, float]] = []


def record(fault: str, seconds: float) -> None:
    MEASURED.append((fault, seconds))


# What every warning or error line must say: what happens next.
NEXT_STEPS = ("retrying in", "reconnecting", "re-registering everything", "treated as publishing nothing",
              "left as it is until the next resync", "expire within", "it expires with its TTL",
              "retrying this container alone in", "not registered",
              "(fine for a single-host demo)", "only hosts on the same link",
              "registering without authentication", "a restart writes everything again",
              "they are kept as they are", "it is left as it is")


def log_line(line: str) -> tuple[str, str] | None:
    """(level, message) of one log line, in the text format or the JSON one; None for any other."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return None
        return (entry["level"], entry["message"]) if isinstance(entry, dict) and "level" in entry else None
    found = re.match(r"\S+ (\w+) +(.*)", line)
    return (found.group(1), found.group(2)) if found else None


def assert_log_is_clean(registrar: Registrar) -> None:
    """No traceback, and every warning or error line (text or JSON format) names its cause and
    what happens next."""
    log = registrar.log
    assert "Traceback" not in log and "unexpected error" not in log, log[-6000:]
    lines = [(line, log_line(line)) for line in log.splitlines()]
    problems = [(line, said[1]) for line, said in lines if said and said[0] in ("warning", "error")]
    vague = [line for line, message in problems if not any(step in message for step in NEXT_STEPS)]
    assert not vague, "log lines that do not say what happens next:\n" + "\n".join(vague)


def image_part(image: str) -> str:
    if "@" not in image and ":" not in image.rsplit("/", 1)[-1]:
        image += ":latest"
    return image.replace("/", "::")


def advertised(binding_ip: str, host: str) -> str | None:
    if not binding_ip:
        return host
    address = ipaddress.ip_address(binding_ip)
    if address.is_loopback:
        return None
    return host if address.is_unspecified else str(address)


def expected_value(inspect: dict, host: str) -> str | None:
    """The value the contract wants for one container; None when it wants no key."""
    state = inspect["State"]
    if not state["Running"] or state["Restarting"]:
        return None
    image = image_part(inspect["Config"]["Image"])
    found = set()
    if inspect["HostConfig"]["NetworkMode"] == "host":
        for port in inspect["Config"].get("ExposedPorts") or {}:
            number, kind = port.split("/")
            found.add((int(number), kind, host, int(number)))
    else:
        for port, bindings in (inspect["NetworkSettings"]["Ports"] or {}).items():
            number, kind = port.split("/")
            for binding in bindings or []:
                ip = advertised(binding["HostIp"], host)
                if ip is not None:
                    found.add((int(number), kind, ip, int(binding["HostPort"])))
    if not found:
        return None
    return json.dumps([{"container": inspect["Id"], "image": image, "ip": ip,
                        "public_port": str(public), "private_port": str(private), "port_type": kind}
                       for private, kind, ip, public in sorted(found)], separators=(",", ":"))


def running_inspects(engine: DockerEngine) -> list[dict]:
    ids = engine.out("ps", "-q", "--no-trunc").split()
    if not ids:
        return []
    # a container may vanish between ps and inspect: the others are still printed
    output = engine.docker("inspect", *ids, check=False).stdout
    return json.loads(output or b"[]")


MAX_RECORD_BYTES = 512 * 1024  # REGISTER_MAX_RECORD_BYTES' default: larger records are not written


def expected_registry(engine: DockerEngine, prefix: str, host: str,
                      max_bytes: int = MAX_RECORD_BYTES) -> dict[str, str]:
    """key -> value, exactly what `<prefix>/<host>` must hold for the containers running now."""
    expected = {}
    for inspect in running_inspects(engine):
        value = expected_value(inspect, host)
        if value is not None and len(value) <= max_bytes:
            key = f"{prefix}/{host}/{image_part(inspect['Config']['Image'])}/{inspect['Id']}"
            expected[key] = value
    return expected


def history(client: etcd.Client, key: str, after: int) -> list[tuple[str, str, str | None]]:
    """Every change below `key` after etcd index `after`: (action, key, value), oldest first."""
    changes = []
    last = client.read("/").etcd_index
    index = after + 1
    while index <= last:
        try:
            event = client.read(key, wait=True, waitIndex=index, recursive=True, timeout=2)
        except etcd.EtcdWatchTimedOut:
            break
        changes.append((event.action, event.key, event.value))
        index = event.modifiedIndex + 1
    return changes


def diff(expected: dict[str, str], actual: dict[str, str]) -> str:
    lines = []
    for key in sorted(expected.keys() | actual.keys()):
        if key not in actual:
            lines.append(f"  missing:    {key}\n      want {expected[key]}")
        elif key not in expected:
            lines.append(f"  unexpected: {key}\n      have {actual[key]}")
        elif actual[key] != expected[key]:
            lines.append(f"  wrong:      {key}\n      want {expected[key]}\n      have {actual[key]}")
    return "\n".join(lines)


class Invariant:
    """Checks the invariant for one registrar's host; seeds neighbours whose keys must not move."""

    def __init__(self, engine: DockerEngine, client: Store, prefix: str, host: str,
                 ttl: bool = True):
        self.engine = engine
        self.client = client
        self.prefix = prefix
        self.host = host
        self.ttl = ttl
        self.host_dir = f"{prefix}/{host}"
        self.neighbours: dict[str, tuple[str, int]] = {}
        self.seed_neighbours()

    def seed_neighbours(self) -> None:
        """Other hosts' records (one whose address starts with this host's) and another prefix."""
        neighbour_hosts = (f"{self.host}1", "10.250.0.9")
        values = {f"{self.prefix}/{other}/neighbour::app:1/{'a' * 64}":
                  f'[{{"container":"{"a" * 64}","ip":"{other}"}}]' for other in neighbour_hosts}
        values[f"{self.prefix}-other/{self.host}/neighbour::app:1/{'b' * 64}"] = "[]"
        for key, value in values.items():
            self.client.put(key, value)
        self.neighbours = {key: (value, self.client.revision(key)) for key, value in values.items()}

    def violations(self) -> str:
        """'' when the invariant holds; otherwise what is wrong, as a readable diff."""
        expected = expected_registry(self.engine, self.prefix, self.host)
        actual = read_tree(self.client, self.host_dir)
        problems = [diff(expected, actual)] if expected != actual else []
        if self.ttl:
            liveness = self.client.liveness(self.host_dir)
            if liveness is None:
                problems.append(f"  {self.host_dir} is missing")
            elif liveness <= 0:
                problems.append(f"  {self.host_dir} has no TTL (v2) or no live lease (v3)")
            elif self.client.api == 3:  # every record goes with the host's lease
                lease = self.client.lease_of(self.host_dir)
                problems += [f"  {key} is not on the host's lease {lease:x}" for key in actual
                             if self.client.lease_of(key) != lease]
        return "\n".join(problems + self.neighbour_changes())

    def neighbour_changes(self) -> list[str]:
        changes = []
        for key, (value, index) in self.neighbours.items():
            now = self.client.get(key)
            if now is None:
                changes.append(f"  neighbour {key} was deleted")
            elif (now, self.client.revision(key)) != (value, index):
                changes.append(f"  neighbour {key} changed: {now} at {self.client.revision(key)}")
        return changes

    def wait(self, timeout: float, registrar: Registrar | None = None, *, since: float | None = None,
             fault: str | None = None) -> float:
        """Poll until the invariant holds; return the seconds since `since` (default: now).

        On timeout, fail with the difference and the end of register.py's log. With `fault`, the
        time is recorded in MEASURED for the session's summary.
        """
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            problems = self.violations()
            if not problems:
                elapsed = time.monotonic() - start
                if fault:
                    record(f"v{self.client.api}: {fault}", elapsed)
                return elapsed
            if time.monotonic() > deadline:
                log = registrar.log[-6000:] if registrar else ""
                raise AssertionError(f"the registry did not converge in {timeout} s:\n{problems}\n"
                                     f"register.py log (end):\n{log}")
            time.sleep(0.1)

    def record_indexes(self, container_ids) -> dict[str, int]:
        """key -> modifiedIndex of these containers' records: unchanged means never rewritten."""
        return {key: self.client.revision(key) for key in read_tree(self.client, self.host_dir)
                if key.rsplit("/", 1)[1] in container_ids}

    def holds(self) -> None:
        problems = self.violations()
        assert not problems, f"the invariant does not hold:\n{problems}"
