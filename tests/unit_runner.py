"""register.service run by a real systemd: a Debian with systemd as PID 1 in a container of the
suite's Docker engine, the unit file bind-mounted unchanged, driven with `systemctl`.

What was found on these machines (and why the container looks the way it does):
- systemd 252 boots as PID 1 of a container of the suite's dockerd; `--privileged` cannot be used
  (the machine's capability bounding set lacks CAP_SYS_RESOURCE, and runc then fails with "unable
  to apply caps"), so the container gets every capability but that one, no seccomp or AppArmor
  filter, tmpfs on /run and /tmp, and a cgroup namespace of its own.
- Docker mounts the container's own cgroups read-only; the entry point remounts them read-write
  before it execs systemd, so systemd manages a subtree of the container's own cgroup, never the
  machine's (bind-mounting the machine's /sys/fs/cgroup would let it write at the machine's root).
- The root filesystem is Debian minbase with systemd (mmdebstrap from the mirror in apt's own
  sources, as tests/image.py does for the registrar's base), cached as a tarball between runs.
- The "host" talks to the suite's dockerd through the engine's socket, bind-mounted at the same
  path as on the machine, with the machine's own docker CLI at /usr/bin/docker: like on a real
  host, a path the unit gives to `docker run -v` means the same file to the CLI and to the daemon.
  docker.service is a stand-in (a oneshot that asks the engine for `docker info`): the engine
  itself runs outside.
- The registrar container, started by the unit with `--net host`, lives in the engine's network
  namespace, which has only loopback: `NetnsForward` gives it the etcd that runs on the machine's
  loopback, at an address and port of the test's choosing inside that namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import socket
import subprocess
import threading
import time
from pathlib import Path

import image
from testbed import DockerEngine, docker_cli, wait_until

SYSTEMD_PACKAGES = ("systemd", "systemd-sysv")
UNIT_PATH = "/etc/systemd/system/register.service"
CONFIG_DIR = "/etc/docker-etcd-register"  # the unit's default REGISTER_CONFIG_DIR; env file inside
CONTAINER = "docker-etcd-register"  # the name the unit gives the registrar container
# Remount the container's cgroups read-write (v1: the tmpfs and each hierarchy; v2: the one
# cgroup2 mount), then become systemd.
ENTRYPOINT = ('for m in $(awk \'$2 ~ "^/sys/fs/cgroup(/|$)" {print $2}\' /proc/self/mounts); do '
              'mount -o remount,rw "$m" 2>/dev/null || mount -o remount,bind,rw "$m"; done; '
              'exec /lib/systemd/systemd')


def systemd_recipe() -> dict:
    codename = image.host_codename()
    return {"tool": "mmdebstrap", "variant": "minbase", "suite": codename,
            "sources": image.apt_sources(codename), "packages": list(SYSTEMD_PACKAGES),
            "dpkg_excludes": list(image.DPKG_EXCLUDES), "dpkg_includes": list(image.DPKG_INCLUDES),
            "arch": platform.machine(), "purpose": "systemd-host"}


def systemd_tarball() -> Path:
    """Debian minbase with systemd as a tar file, cached like tests/image.py's base (lock file,
    atomic rename)."""
    recipe = systemd_recipe()
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    tarball = image.CACHE / f"systemd-host-{key}.tar"
    if tarball.exists():
        return tarball
    with image.locked(image.CACHE / f"systemd-host-{key}.lock"):
        if tarball.exists():
            return tarball
        partial = image.CACHE / f".systemd-host-{key}.{os.getpid()}.tar"
        dpkg_options = [f"--dpkgopt=path-exclude={p}" for p in recipe["dpkg_excludes"]] + \
                       [f"--dpkgopt=path-include={p}" for p in recipe["dpkg_includes"]]
        try:
            with image.timed("systemd host root filesystem (mmdebstrap)"):
                image.run("mmdebstrap", "--quiet", "--mode=root", f"--variant={recipe['variant']}",
                          f"--include={','.join(recipe['packages'])}", *dpkg_options,
                          recipe["suite"], str(partial), *recipe["sources"])
            os.replace(partial, tarball)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return tarball


def systemd_image(engine: DockerEngine) -> str:
    """The systemd host's image in `engine` (imported from the cached tarball if missing)."""
    tarball = systemd_tarball()
    name = f"regtest/systemd-host:{tarball.stem.removeprefix('systemd-host-')}"
    if not image.has_image(engine, name):
        with image.timed("docker import of the systemd host"):
            engine.docker("import", "--change", "ENV container=docker", "--change",
                          f"ENV PATH={image.BASE_PATH}", str(tarball), name, timeout=600)
    return name


class SystemdHost:
    """A machine with systemd as PID 1 (a container of `engine`) that runs register.service
    from `unit` unchanged, with /etc/environment and /etc/docker-etcd-register/ from `workdir`."""

    def __init__(self, engine: DockerEngine, systemd_image_name: str, unit: Path, workdir: Path,
                 name: str):
        self.engine = engine
        self.image = systemd_image_name
        self.unit = unit
        self.name = name
        self.dir = workdir / name
        self.config_dir = self.dir / "config"  # the host's /etc/docker-etcd-register
        self.environment = self.dir / "environment"  # the host's /etc/environment
        self.docker_unit = self.dir / "docker.service"

    @property
    def env_file(self) -> Path:
        return self.config_dir / "env"

    def start(self) -> SystemdHost:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.environment.touch()
        socket_path = str(self.engine.socket)
        self.docker_unit.write_text(
            "[Unit]\nDescription=Stand-in for the host's Docker engine (the suite's dockerd runs "
            "outside this container)\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart=/usr/bin/docker -H unix://{socket_path} info --format {{{{.ServerVersion}}}}\n")
        self.engine.docker(
            "run", "-d", "--pull=never", "--name", self.name, "--hostname", self.name,
            "--network", "none", "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            "--cgroupns", "private", "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp",
            "-v", f"{docker_cli()}:/usr/bin/docker:ro",
            "-v", f"{socket_path}:{socket_path}",
            "-v", f"{self.unit.resolve()}:{UNIT_PATH}:ro",
            "-v", f"{self.docker_unit}:/etc/systemd/system/docker.service:ro",
            "-v", f"{self.environment}:/etc/environment:ro",
            "-v", f"{self.config_dir}:{CONFIG_DIR}:ro",
            "--entrypoint", "/bin/sh", self.image, "-c", ENTRYPOINT)
        state = wait_until(self._booted, 60, f"systemd in {self.name} to finish booting", interval=0.2)
        if state != "running":
            failed = self.exec("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"systemd in {self.name} is {state}: {failed}")
        return self

    def _booted(self) -> str | None:
        state = self.exec("systemctl", "is-system-running", check=False).stdout.strip()
        return state if state in ("running", "degraded") else None

    def exec(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = self.engine.docker("exec", self.name, *args, check=False, timeout=timeout)
        result.stdout = result.stdout.decode(errors="replace")
        result.stderr = result.stderr.decode(errors="replace")
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {self.name} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.exec("systemctl", *args, check=check, timeout=timeout)

    def show(self, *properties: str, unit: str = "register.service") -> dict[str, str]:
        """systemd's view of the unit: `systemctl show -p ...` as a dict (a property that systemd
        prints once per value, such as EnvironmentFiles, has its lines joined with newlines)."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        shown: dict[str, str] = {}
        for line in out.splitlines():
            name, _, value = line.partition("=")
            shown[name] = f"{shown[name]}\n{value}" if name in shown else value
        return shown

    def journal(self, unit: str = "register.service") -> str:
        return self.exec("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def container_id(self) -> str | None:
        """The id of the registrar container the unit runs now, None when there is none."""
        out = self.engine.docker("ps", "-q", "--no-trunc", "--filter", f"name=^/{CONTAINER}$",
                                 check=False).stdout.decode().strip()
        return out or None

    def stop(self) -> None:
        self.engine.docker("rm", "-f", self.name, check=False)
        self.engine.docker("rm", "-f", CONTAINER, check=False)


# Forwarding into a network namespace -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def listen_in_netns(netns_path: str, address: str, port: int) -> socket.socket:
    """A listening TCP socket that lives in another network namespace.

    A socket stays in the namespace it was made in: a short-lived thread enters the namespace
    (setns applies to the calling thread only), makes the socket, and goes back; the rest of the
    process never leaves the machine's namespace."""
    made: dict[str, object] = {}

    def make() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(netns_path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, port))
                listener.listen(64)
                made["socket"] = listener
            finally:
                _setns(own)
        except OSError as error:
            made["error"] = error
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["socket"]


class NetnsForward:
    """TCP from `address:port` inside a network namespace to `target` on the machine's loopback.

    The registrar container (host networking in the suite's engine) thus reaches an etcd of the
    suite, and the test reads that etcd directly: no traffic leaves loopback and the namespace."""

    def __init__(self, netns_path: str, address: str, port: int, target: tuple[str, int]):
        self.listener = listen_in_netns(netns_path, address, port)
        self.target = target
        self.connections: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(self.target, timeout=5)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            self.connections += [inside, outside]
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.connections:
            connection.close()


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """wait_until that also returns how long it took: (value, seconds)."""
    started = time.monotonic()
    value = wait_until(condition, timeout, what, interval)
    return value, time.monotonic() - started
