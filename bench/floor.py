"""The floor: the least work any registrar must do, with nothing else (no retries, no checks).

    floor.py cold ETCD_URL PREFIX HOST_IP     one `list containers` call, then one sequential etcd v2
                                              put per container over one kept-alive connection
    floor.py events ETCD_URL PREFIX HOST_IP   follow Docker's events: start -> one inspect and one
                                              put, die -> one delete; prints "ready" once subscribed

It writes the same keys and values as register.py for containers that publish on wildcard
addresses (what the benchmark runs), so the benchmark can check that both wrote the same tree.
"""
from __future__ import annotations

import json
import sys

import docker
import requests


def value(container_id: str, image: str, host_ip: str, ports) -> str:
    """ports: (private, type, public) triples."""
    return json.dumps([{"container": container_id, "image": image, "ip": host_ip, "public_port": str(public),
                        "private_port": str(private), "port_type": kind}
                       for private, kind, public in sorted(set(ports))], separators=(",", ":"))


def image_part(image: str) -> str:
    if "@" not in image and ":" not in image.rsplit("/", 1)[-1]:
        image += ":latest"
    return image.replace("/", "::")


def cold(api: docker.APIClient, session: requests.Session, base: str, host_ip: str) -> None:
    for container in api.containers():
        ports = [(p["PrivatePort"], p["Type"], p["PublicPort"])
                 for p in container["Ports"] if "PublicPort" in p]
        if not ports:
            continue
        image = image_part(container["Image"])
        key = f"{base}/{image}/{container['Id']}"
        session.put(key, data={"value": value(container["Id"], image, host_ip, ports)}).raise_for_status()


def events(api: docker.APIClient, session: requests.Session, base: str, host_ip: str) -> None:
    keys = {}
    stream = api.events(decode=True, filters={"type": ["container"], "event": ["start", "die"]})
    print("ready", flush=True)
    for event in stream:
        container_id = event["id"]
        if event["Action"] == "start":
            inspect = api.inspect_container(container_id)
            ports = [(int(port.split("/")[0]), port.split("/")[1], int(binding["HostPort"]))
                     for port, bindings in inspect["NetworkSettings"]["Ports"].items()
                     for binding in bindings or []]
            image = image_part(inspect["Config"]["Image"])
            keys[container_id] = f"{base}/{image}/{container_id}"
            session.put(keys[container_id], data={"value": value(container_id, image, host_ip, ports)})
        elif container_id in keys:
            session.delete(keys.pop(container_id))


def main() -> None:
    mode, etcd_url, prefix, host_ip = sys.argv[1:5]
    api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
    session = requests.Session()
    base = f"{etcd_url}/v2/keys{prefix}/{host_ip}"
    {"cold": cold, "events": events}[mode](api, session, base, host_ip)


if __name__ == "__main__":
    main()
