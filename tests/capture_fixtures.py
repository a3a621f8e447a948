#!/usr/bin/env python3
"""Capture `docker inspect` output from a real engine into tests/fixtures/inspect/.

The unit tests of the record logic are fed with these files. Run as root on a machine with the
test bed's packages (scripts/test installs them): python3 tests/capture_fixtures.py
Each file keeps the command line that made the container beside its inspect output.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import testbed

OUT = Path(__file__).parent / "fixtures" / "inspect"
IMAGE = testbed.BASE_IMAGE


def main() -> None:
    workdir = testbed.make_workdir()
    engine = testbed.DockerEngine(workdir, name="capture")
    try:
        engine.start()
        engine.build_images()
        engine.start_registry()
        engine.docker("tag", IMAGE, "example.org:5000/team/app:1.2")
        engine.docker("tag", IMAGE, f"{testbed.REGISTRY}/a/b/c/app:latest")
        engine.docker("tag", IMAGE, f"{testbed.REGISTRY}/team/app:1.2")
        digest = engine.push(f"{testbed.REGISTRY}/team/app:1.2")
        image_id = engine.out("image", "inspect", "--format", "{{.Id}}", IMAGE)
        cases = {
            "wildcard_tcp_udp": ["-p", "80", "-p", "53/udp", IMAGE],
            "specific_addresses": ["-p", f"{testbed.SPECIFIC_IPV4}:8080:80", "-p", "127.0.0.1:8081:80",
                                   "-p", "[::1]:8082:80", "-p", f"[{testbed.SPECIFIC_IPV6}]:8083:80",
                                   IMAGE],
            "loopback_only": ["-p", "127.0.0.1:8084:80", "-p", "[::1]:8084:80", IMAGE],
            "several_ports": ["-p", "8443:443", "-p", "8180:80", "-p", "9000:9000/udp",
                              "-p", "8181:80", "-p", "5353:53/udp", "-p", "5354:53", IMAGE],
            "twins_on_different_ports": ["-p", "0.0.0.0:8085:80", "-p", "[::]:8086:80", IMAGE],
            "publish_all": ["-P", "--expose", "9090", "--expose", "7070/udp", IMAGE],
            "host_network": ["--network", "host", "--expose", "8090/udp", IMAGE,
                             "httpd", "-f", "-p", "8099"],
            "no_published_port": [IMAGE],
            "image_registry_port": ["-p", "8087:80", "example.org:5000/team/app:1.2"],
            "image_nested_no_tag": ["-p", "8088:80", f"{testbed.REGISTRY}/a/b/c/app"],
            "image_digest": ["-p", "8089:80", digest],
            "image_short_id": ["-p", "8091:80", image_id.split(":", 1)[1][:12]],
            "image_full_id": ["-p", "8092:80", image_id],
            "paused": ["-p", "8093:80", IMAGE],
            "exited": ["-p", "8094:80", IMAGE, "true"],
        }
        OUT.mkdir(parents=True, exist_ok=True)
        for name, args in cases.items():
            command = ["run", "-d", "--name", name, *args]
            engine.docker(*command)
        engine.docker("pause", "paused")
        testbed.wait_until(lambda: engine.out("inspect", "--format", "{{.State.Status}}", "exited")
                           == "exited", 10, "the exited container to exit")
        for name, args in cases.items():
            data = {"command": "docker run -d --name " + " ".join([name, *args]),
                    "inspect": engine.inspect(name)}
            (OUT / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            print(f"wrote {OUT / name}.json")
    finally:
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
