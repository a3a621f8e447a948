"""A verified fake: the registry seam (register.Registry) over an etcd kept in memory.

`MemoryEtcd` is a keyspace with revisions and leases that expire by the monotonic clock, as etcd
v3 keeps them; several `MemoryRegistry`s (hosts, restarts, engines) share one. `MemoryRegistry`
is a third adapter behind the seam, modelled on the v3 one: one lease per host, the host key holds
the owner record and guards every write, a read writes nothing. `MemoryStore` is the tests' view
of the keyspace, as tests/store.py's are of a real etcd.

It passes the same contract suite as the two etcd adapters (tests/test_contract.py, the `memory`
backend), which is what lets the reconciler's own tests (tests/test_reconciler.py) run on it, in the
fast tier: no server, no network, no root. The integration and chaos suites keep proving the
reconciler against the real processes.

What it adds for those tests: `down` (every request fails, as when no endpoint answers),
`refuse` (keys whose puts etcd refuses, as a record over its request limit), `refused` (puts
refused), `writes` (write requests made) and `requests` (all of them).
"""
from __future__ import annotations

import logging
import threading
import time

import register

MAX_REQUEST_BYTES = 1536 * 1024  # etcd's default --max-request-bytes


class MemoryEtcd:
    """key -> {"value", "lease", "mod_revision"}; lease -> [granted TTL, monotonic expiry]."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.lock = threading.RLock()
        self.revision = 1
        self.kvs: dict[str, dict] = {}
        self.leases: dict[int, list] = {}
        self._next_lease = 0x7E57_0000
        self.down: str | None = None  # why every request fails, while it does
        self.refuse: set[str] = set()  # keys whose puts are refused
        self.requests = 0
        self.writes = 0
        self.refused = 0  # puts refused

    # -- what a request meets ------------------------------------------------------------------

    def request(self, write: bool = False) -> None:
        """Counted; raises RegistryUnavailable while `down`; expires what is due."""
        with self.lock:
            self.requests += 1
            if self.down:
                raise register.RegistryUnavailable(f"etcd at memory failed: {self.down}")
            if write:
                self.writes += 1
            self.expire()

    def expire(self) -> None:
        with self.lock:
            now = self.clock()
            for lease in [lease for lease, (_, until) in self.leases.items() if until <= now]:
                self.revoke(lease)

    # -- the keyspace --------------------------------------------------------------------------

    def get(self, key: str) -> dict | None:
        with self.lock:
            self.expire()
            kv = self.kvs.get(key)
            return dict(kv) if kv else None

    def range(self, prefix: str) -> dict[str, dict]:
        with self.lock:
            self.expire()
            return {key: dict(kv) for key, kv in sorted(self.kvs.items()) if key.startswith(prefix)}

    def put(self, key: str, value: str, lease: int = 0) -> None:
        with self.lock:
            if lease and lease not in self.leases:
                raise register.LeaseGone(f"lease {lease:x} not found", lease)
            self.revision += 1
            self.kvs[key] = {"value": value, "lease": lease, "mod_revision": self.revision}

    def delete(self, key: str) -> bool:
        with self.lock:
            if self.kvs.pop(key, None) is None:
                return False
            self.revision += 1
            return True

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        with self.lock:
            self._next_lease += 1
            self.leases[self._next_lease] = [ttl, self.clock() + ttl]
            return self._next_lease

    def left(self, lease: int) -> int:
        """Seconds the lease has left (rounded up, as etcd does), -1 when it is gone."""
        with self.lock:
            self.expire()
            if lease not in self.leases:
                return -1
            return max(1, int(self.leases[lease][1] - self.clock() + 0.999))

    def keep_alive(self, lease: int) -> int:
        with self.lock:
            self.expire()
            if lease not in self.leases:
                return 0
            self.leases[lease][1] = self.clock() + self.leases[lease][0]
            return self.leases[lease][0]

    def keys_on(self, lease: int) -> list[str]:
        with self.lock:
            return sorted(key for key, kv in self.kvs.items() if kv["lease"] == lease)

    def revoke(self, lease: int) -> None:
        with self.lock:
            if self.leases.pop(lease, None) is None:
                return
            for key in self.keys_on(lease):
                self.delete(key)


class MemoryRegistry(register.Registry):
    """The seam, in memory, with the v3 adapter's model: one lease per host carries the host key
    (the owner record) and every record; a read writes nothing and leaves a missing host key to
    the next apply."""

    LIVENESS = "lease"
    REFRESHED = "lease"
    FLAT = True

    def __init__(self, config: register.Config, etcd: MemoryEtcd):
        super().__init__(config)
        self.etcd = etcd
        self.lease: int | None = None
        self._host_stored: str | None = None  # the host key's value as this registrar wrote it
        self._repair = False
        self._foreign_said: frozenset = frozenset()

    def made_anew(self) -> str:
        return f"lease of {self.host_dir} was granted anew"

    def liveness(self) -> str:
        return f"lease {self.lease:x} of {self.host_dir}" if self.lease else f"the lease of {self.host_dir}"

    def check_api(self) -> None:
        self.etcd.request()
        self._api_checked = True

    def prepare(self) -> bool:
        self.check_api()
        if self._ready:
            return False
        with self.etcd.lock:
            return self._prepare_locked()

    def _owner(self, kv: dict | None) -> dict | None:
        return register._owner_json(kv["value"]) if kv else None

    def _check_owner(self, kv: dict | None) -> None:
        record = self._owner(kv)
        other = record["engine"] if record else None
        if not other or other == self.engine_id:
            return
        if kv["lease"] and self.etcd.left(kv["lease"]) <= 0:
            return
        self.lease, self._ready, self._host_stored = None, False, None
        where = (f"{self.host_dir} on lease {kv['lease']:x}" if kv["lease"]
                 else f"{self.host_dir} without a lease")
        raise self._conflict(other, where)

    def _put_host_key(self) -> None:
        self.scope.check(self.host_dir, host_dir=True)
        self.etcd.writes += 1
        self.etcd.put(self.host_dir, self._owner_text(), self.lease or 0)
        self._host_stored = self._owner_text()

    def _prepare_locked(self) -> bool:
        kv = self.etcd.get(self.host_dir)
        self._check_owner(kv)
        record = self._owner(kv)
        on_lease = kv["lease"] if kv else 0
        self._repair = False
        if not self.ttl:
            self.lease = None
            self._started = record["started"] if record else (self._started or register._now())
            intact = kv is not None and not on_lease and kv["value"] == self._owner_text()
        else:
            candidate = self.lease or on_lease
            left = self.etcd.left(candidate) if candidate else -1
            granted = self.etcd.leases.get(candidate, [0])[0] if candidate else 0
            if left > 0 and (candidate == self.lease or (granted == self.ttl and record is not None)):
                self._say_foreign(candidate)
                if self.lease is None:
                    register.log_event(logging.INFO, f"adopted lease {candidate:x} of {self.host_dir}",
                                       event="lease_adopted", lease=f"{candidate:x}")
                self.lease, self._lost = candidate, None
                if record is not None and on_lease == candidate:
                    self._started = record["started"]
                self._started = self._started or register._now()
                intact = on_lease == candidate and kv["value"] == self._owner_text()
            else:
                lost = self._lost or (f"lease {self.lease:x} of {self.host_dir} had expired or been "
                                      "revoked" if self.lease else None)
                self.etcd.writes += 1
                self.lease, self._lost = self.etcd.grant(self.ttl), None
                self._started = register._now()
                self._put_host_key()
                if lost:
                    register.log_event(logging.WARNING, f"{lost}; re-registering everything on new "
                                       f"lease {self.lease:x}", event="host_dir_lost",
                                       lease=f"{self.lease:x}")
                else:
                    register.log_event(logging.INFO, f"granted lease {self.lease:x} ({self.ttl} s) for "
                                       f"{self.host_dir}", event="lease_granted", lease=f"{self.lease:x}")
                self._ready, self.granted_new = True, True
                return True
        if not intact:
            self._put_host_key()
        self._host_stored = self._owner_text()
        self._ready, self.granted_new = True, False
        return not intact

    def _say_foreign(self, lease: int) -> list[str]:
        foreign = [key for key in self.etcd.keys_on(lease)
                   if key != self.host_dir and not self.scope.owns(key)]
        if foreign and frozenset(foreign) != self._foreign_said:
            register.log_event(logging.WARNING, f"keys that are not this host's ride on lease {lease:x} "
                               f"of {self.host_dir}: {', '.join(foreign)}; they are kept as they are",
                               event="foreign_keys_on_lease", lease=f"{lease:x}", keys=foreign)
        self._foreign_said = frozenset(foreign)
        return foreign

    def heartbeat(self, timeout: float) -> str | None:
        lease = self.lease
        if lease is None:
            return None
        try:
            self.etcd.request()
        except register.RegistryUnavailable as exc:
            raise register.HeartbeatFailed(str(exc), "memory", "memory", self.etcd.down) from None
        self._answered()
        if self.etcd.keep_alive(lease):
            return None
        lost = f"lease {lease:x} of {self.host_dir} had expired or been revoked"
        if self.lease == lease:
            self.lease, self._ready, self._lost = None, False, lost
        return lost

    def read(self) -> register.Records:
        """One range per key space; writes nothing."""
        self.etcd.request()
        self._answered()
        with self.etcd.lock:
            host = self.etcd.get(self.host_dir)
            kvs = {}
            for head in self.scope.reads():
                kvs.update((key, kv) for key, kv in self.etcd.range(head + "/").items()
                           if self.scope.owns(key))
        self._check_owner(host)
        lease = self.lease
        if lease is None and self.ttl and host is not None:
            lease = host["lease"] or None
        detached = frozenset(key for key, kv in kvs.items() if kv["lease"] != (lease or 0))
        self._repair = not (host is not None and host["lease"] == (lease or 0)
                            and host["value"] == self._owner_text())
        return register.Records({key: kv["value"] for key, kv in kvs.items()}, detached)

    def apply(self, deletes, puts, report, keep=None) -> None:
        for key in deletes:
            self.scope.check(key, found=True)
        for key, _ in puts:
            self.scope.check(key)
        self.etcd.request(write=True)
        self._answered()
        with self.etcd.lock:
            if self.lease is not None and self.lease not in self.etcd.leases:
                self._ready, self._lost = False, (f"lease {self.lease:x} of {self.host_dir} had expired "
                                                  "or been revoked")
                raise register.HostLost(f"lease {self.lease:x} was gone")
            if self._repair:
                self._repair = False
                self._put_host_key()
                register.log_event(logging.WARNING, f"host key {self.host_dir} was missing or not this "
                                   "registrar's; written again", event="host_key_repaired",
                                   key=self.host_dir)
            for key in deletes:
                self.etcd.delete(key)
                report(key, None)
            for key, value in puts:
                size = len(key.encode("utf-8", "surrogateescape")) + len(value.encode("utf-8",
                                                                                     "surrogateescape"))
                if key in self.etcd.refuse or size > MAX_REQUEST_BYTES:
                    self.etcd.refused += 1
                    report(key, register.RecordRefused("etcd refused it: request is too large"))
                    continue
                self.etcd.put(key, value, self.lease or 0)
                report(key, None)

    def clear(self) -> bool:
        if self._host_stored is None:
            return False
        self.etcd.request(write=True)
        with self.etcd.lock:
            host = self.etcd.get(self.host_dir)
            if host is None or host["value"] != self._host_stored:
                if host is None:
                    register.log_event(logging.INFO, f"nothing left to delete under {self.host_dir}/ on "
                                       "exit: the lease had expired or been revoked",
                                       event="deregister_skipped")
                    return True
                register.log_event(logging.WARNING, f"not deleting {self.host_dir}/ on exit: its host key "
                                   "no longer holds this registrar's record", event="deregister_skipped")
                return False
            for head in self.scope.reads():
                for key in [key for key in self.etcd.range(head + "/") if self.scope.owns(key)]:
                    self.etcd.delete(key)
            self.etcd.delete(self.host_dir)
            lease, self.lease = self.lease, None
            if lease and not self._say_foreign(lease):
                self.etcd.revoke(lease)
        return True


class MemoryStore:
    """The tests' view of a MemoryEtcd, with the interface of tests/store.py's stores."""

    api = 0

    def __init__(self, etcd: MemoryEtcd):
        self.etcd = etcd

    def records(self, host_dir: str) -> dict[str, str]:
        return {key: kv["value"] for key, kv in self.etcd.range(host_dir + "/").items()}

    def get(self, key: str) -> str | None:
        kv = self.etcd.get(key)
        return kv["value"] if kv else None

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self.etcd.put(key, value, lease)

    def delete(self, key: str) -> None:
        self.etcd.delete(key)

    def revision(self, key: str) -> int:
        kv = self.etcd.get(key)
        return kv["mod_revision"] if kv else 0

    def head(self) -> int:
        return self.etcd.revision

    def lease_of(self, key: str) -> int:
        kv = self.etcd.get(key)
        return kv["lease"] if kv else 0

    def lease_ttl(self, lease: int) -> tuple[int, int]:
        left = self.etcd.left(lease)
        return left, (self.etcd.leases[lease][0] if left > 0 else 0)

    def grant_lease(self, ttl: int) -> int:
        return self.etcd.grant(ttl)

    def revoke(self, lease: int) -> None:
        self.etcd.revoke(lease)

    def liveness(self, host_dir: str) -> int | None:
        kv = self.etcd.get(host_dir)
        if kv is None:
            return None
        return self.etcd.left(kv["lease"]) if kv["lease"] else 0

    def host_present(self, host_dir: str) -> bool:
        return self.liveness(host_dir) is not None

