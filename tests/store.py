"""What etcd holds, read and changed as an operator would: one interface over the v2 and the v3 API.

The tests see the registry through this, whichever API the registrar under test speaks. The v3
side speaks etcd's JSON gateway with requests and base64 directly: a view of etcd that shares no
code with register.py's adapters.
"""
from __future__ import annotations

import base64
import time

import etcd
import requests


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode()


def _text(data: str | None) -> str:
    return base64.b64decode(data or "").decode("utf-8", "surrogateescape")


class Store:
    api = 0

    def records(self, host_dir: str) -> dict[str, str]:
        """Every key below `host_dir`/ (key -> value), {} when there is none."""
        raise NotImplementedError

    def get(self, key: str) -> str | None:
        raise NotImplementedError

    def put(self, key: str, value: str) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """The key and, on v2, a whole directory there."""
        raise NotImplementedError

    def revision(self, key: str) -> int:
        """v2 modifiedIndex / v3 mod_revision of `key`."""
        raise NotImplementedError

    def head(self) -> int:
        """The store's current index / revision."""
        raise NotImplementedError

    def changes_since(self, prefix: str, index: int) -> int:
        """How many changes under `prefix` came after `index` (0: watchers saw nothing)."""
        raise NotImplementedError

    def liveness(self, host_dir: str) -> int | None:
        """Seconds the host's keys have left (v2: the host directory's TTL; v3: the host key's
        lease); 0 when they never expire; None when the host directory / host key is missing."""
        raise NotImplementedError

    def host_present(self, host_dir: str) -> bool:
        return self.liveness(host_dir) is not None


class V2Store(Store):
    api = 2

    def __init__(self, client: etcd.Client):
        self.client = client

    def __getattr__(self, name: str):  # the rest of python-etcd's client, for v2-only checks
        return getattr(self.client, name)

    def records(self, host_dir: str) -> dict[str, str]:
        try:
            top = self.client.read(host_dir, recursive=True)
        except etcd.EtcdKeyNotFound:
            return {}
        return {node.key: node.value for node in top.get_subtree() if not node.dir}

    def get(self, key: str) -> str | None:
        try:
            return self.client.read(key).value
        except etcd.EtcdKeyNotFound:
            return None

    def put(self, key: str, value: str) -> None:
        self.client.write(key, value)

    def delete(self, key: str) -> None:
        try:
            node = self.client.read(key)
            self.client.delete(key, recursive=node.dir, dir=node.dir)
        except etcd.EtcdKeyNotFound:
            pass

    def revision(self, key: str) -> int:
        return self.client.read(key).modifiedIndex

    def head(self) -> int:
        return self.client.read("/").etcd_index

    def changes_since(self, prefix: str, index: int) -> int:
        try:
            self.client.watch(prefix, index=index + 1, recursive=True, timeout=1)
            return 1
        except etcd.EtcdWatchTimedOut:
            return 0

    def liveness(self, host_dir: str) -> int | None:
        try:
            node = self.client.read(host_dir)
        except etcd.EtcdKeyNotFound:
            return None
        return node.ttl or 0


class V3Store(Store):
    api = 3

    def __init__(self, url: str, session: requests.Session | None = None, token: str | None = None):
        self.url = url
        self.session = session or requests.Session()
        self.session.trust_env = False
        if token:
            self.session.headers["Authorization"] = token

    def call(self, path: str, body: dict) -> dict:
        answer = self.session.post(f"{self.url}/v3/{path}", json=body, timeout=5)
        answer.raise_for_status()
        return answer.json()

    def range(self, key: str, end: str | None = None) -> list[dict]:
        body = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        return self.call("kv/range", body).get("kvs") or []

    def records(self, host_dir: str) -> dict[str, str]:
        start = host_dir + "/"
        return {_text(kv["key"]): _text(kv.get("value")) for kv in self.range(start, start[:-1] + "0")}

    def kv(self, key: str) -> dict | None:
        found = self.range(key)
        return found[0] if found else None

    def get(self, key: str) -> str | None:
        kv = self.kv(key)
        return None if kv is None else _text(kv.get("value"))

    def put(self, key: str, value: str, lease: int = 0) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.call("kv/put", body)

    def delete(self, key: str) -> None:
        self.call("kv/deleterange", {"key": _b64(key)})

    def revision(self, key: str) -> int:
        return int(self.kv(key)["mod_revision"])

    def head(self) -> int:
        return int(self.call("kv/range", {"key": _b64("\0")})["header"]["revision"])

    def changes_since(self, prefix: str, index: int) -> int:
        # every key at or below the prefix, at its latest revision: any change there shows
        kvs = self.range(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)) if prefix else []
        return sum(1 for kv in kvs if int(kv["mod_revision"]) > index)

    def lease_of(self, key: str) -> int:
        kv = self.kv(key)
        return int(kv.get("lease", 0)) if kv else 0

    def lease_ttl(self, lease: int) -> tuple[int, int]:
        answer = self.call("lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1)), int(answer.get("grantedTTL", 0))

    def liveness(self, host_dir: str) -> int | None:
        kv = self.kv(host_dir)
        if kv is None:
            return None
        lease = int(kv.get("lease", 0))
        return self.lease_ttl(lease)[0] if lease else 0

    def revoke(self, lease: int) -> None:
        self.call("lease/revoke", {"ID": str(lease)})

    def grant_lease(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl})["ID"])

    def wait_for_revision_change(self, seconds: float) -> None:
        time.sleep(seconds)
