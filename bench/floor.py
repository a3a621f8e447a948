"""The floor: the least work any registrar must do, with nothing else (no retries, no checks).

    floor.py cold ETCD_URL PREFIX HOST_IP [API]     one `list containers` call, then the writes:
        API 2 (default): one sequential etcd v2 put per container over one kept-alive connection;
        API 3: one lease grant, then transactions of up to 128 puts on that lease, through etcd3gw
               (etcd's JSON gateway) as register.py speaks it
    floor.py events ETCD_URL PREFIX HOST_IP [API]   follow Docker's events: start -> one inspect and
        one put (v3: on a lease granted first), die -> one delete; prints "ready" once subscribed

It writes the same keys and values as register.py for containers that publish on wildcard
addresses (what the benchmark runs), so the benchmark can check that both wrote the same tree.
"""
from __future__ import annotations

import base64
import json
import sys
from urllib.parse import urlsplit

import docker
import requests
from etcd3gw.client import Etcd3Client

TTL = 3600  # the floor keeps no heartbeat: its lease must outlive every measure, under load too
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops, as register.py


def value(container_id: str, image: str, host_ip: str, ports) -> str:
    """ports: (private, type, public) triples."""
    return json.dumps([{"container": container_id, "image": image, "ip": host_ip, "public_port": str(public),
                        "private_port": str(private), "port_type": kind}
                       for private, kind, public in sorted(set(ports))], separators=(",", ":"))


def image_part(image: str) -> str:
    if "@" not in image and ":" not in image.rsplit("/", 1)[-1]:
        image += ":latest"
    return image.replace("/", "::")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def listed_records(api: docker.APIClient, base: str, host_ip: str) -> list[tuple[str, str]]:
    """(key, value) of every listed container that publishes a port: one `list containers` call."""
    records = []
    for container in api.containers():
        ports = [(p["PrivatePort"], p["Type"], p["PublicPort"])
                 for p in container["Ports"] if "PublicPort" in p]
        if not ports:
            continue
        image = image_part(container["Image"])
        records.append((f"{base}/{image}/{container['Id']}", value(container["Id"], image, host_ip, ports)))
    return records


def inspected_record(api: docker.APIClient, container_id: str, base: str, host_ip: str) -> tuple[str, str]:
    inspect = api.inspect_container(container_id)
    ports = [(int(port.split("/")[0]), port.split("/")[1], int(binding["HostPort"]))
             for port, bindings in inspect["NetworkSettings"]["Ports"].items()
             for binding in bindings or []]
    image = image_part(inspect["Config"]["Image"])
    return f"{base}/{image}/{container_id}", value(container_id, image, host_ip, ports)


def events_stream(api: docker.APIClient):
    stream = api.events(decode=True, filters={"type": ["container"], "event": ["start", "die"]})
    print("ready", flush=True)
    return stream


class V2:
    def __init__(self, etcd_url: str, prefix: str, host_ip: str):
        self.session = requests.Session()
        self.base = f"{etcd_url}/v2/keys{prefix}/{host_ip}"

    def cold(self, records: list[tuple[str, str]]) -> None:
        for key, data in records:
            self.session.put(key, data={"value": data}).raise_for_status()

    def put(self, key: str, data: str) -> None:
        self.session.put(key, data={"value": data})

    def delete(self, key: str) -> None:
        self.session.delete(key)


class V3:
    """The same kind of client as register.py's: etcd3gw over a requests session that ignores
    the environment's proxies, one lease for everything."""

    def __init__(self, etcd_url: str, prefix: str, host_ip: str):
        session = requests.Session()
        session.trust_env = False
        url = urlsplit(etcd_url)
        self.client = Etcd3Client(host=url.hostname, port=url.port, protocol=url.scheme, timeout=30,
                                  api_path="/v3/", session=session)
        self.base = f"{prefix}/{host_ip}"
        self.lease = self.client.post(self.client.get_url("/lease/grant"), json={"TTL": TTL, "ID": 0})["ID"]

    def cold(self, records: list[tuple[str, str]]) -> None:
        for start in range(0, len(records), MAX_TXN_OPS):
            self.client.post(self.client.get_url("/kv/txn"), json={"success": [
                {"request_put": {"key": b64(key), "value": b64(data), "lease": self.lease}}
                for key, data in records[start:start + MAX_TXN_OPS]]})

    def put(self, key: str, data: str) -> None:
        self.client.post(self.client.get_url("/kv/put"),
                         json={"key": b64(key), "value": b64(data), "lease": self.lease})

    def delete(self, key: str) -> None:
        self.client.post(self.client.get_url("/kv/deleterange"), json={"key": b64(key)})


def main() -> None:
    mode, etcd_url, prefix, host_ip = sys.argv[1:5]
    api_version = sys.argv[5] if len(sys.argv) > 5 else "2"
    api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    etcd = {"2": V2, "3": V3}[api_version](etcd_url, prefix, host_ip)
    if mode == "cold":
        etcd.cold(listed_records(api, etcd.base, host_ip))
        return
    keys = {}
    for event in events_stream(api):
        container_id = event["id"]
        if event["Action"] == "start":
            key, data = inspected_record(api, container_id, etcd.base, host_ip)
            keys[container_id] = key
            etcd.put(key, data)
        elif container_id in keys:
            etcd.delete(keys.pop(container_id))


if __name__ == "__main__":
    main()
