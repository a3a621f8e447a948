"""The registrar's container image, built without any image registry.

No registry is reachable from these machines, so the image's base is made here: a minimal Debian
root filesystem with python3 and python3-venv (mmdebstrap, from the Debian mirror in apt's own
sources), `docker import`ed into the engine under test. The requirements are built into wheels on
the host (containers here cannot reach PyPI: the egress proxy's CA is only in the host's bundle)
and installed in the image from those files, `--no-index`. Then the repository's Dockerfile is
built with `--build-arg BASE_IMAGE=<that base>`.

The root filesystem and the wheels are cached between runs under CACHE, each keyed by a hash of
its recipe, so only the first run on a machine pays for them (see the timings in the report of
`python tests/image.py`). Concurrent runs are safe: each cache entry is made under a lock file and
appears by an atomic rename.

Used by tests/test_image.py (one build per session) and by the other suites that run the
registrar as a container: `registrar_image(engine)` builds it in an engine, `load_into(src, dst,
tag)` copies it to another engine (`docker save | docker load`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from testbed import ROOT, DockerEngine, docker_cli

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("REGTEST_IMAGE_CACHE", "/var/cache/docker-etcd-register-tests"))
BASE_PACKAGES = ("python3", "python3-venv")
# Documentation, manual pages and translations are never read in the image: leave them out
# (copyright files stay).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*")
DPKG_INCLUDES = ("/usr/share/doc/*/copyright",)
# Merged /usr by symlinks (usr-is-merged) rather than by the usrmerge package, which pulls in perl
# (some 45 MB the image never uses).
MMDEBSTRAP_HOOKS = "/usr/share/mmdebstrap/hooks/merged-usr"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_TAG = "docker-etcd-register:test"
# What the Dockerfile's build needs from the repository (with wheels/ beside them).
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "requirements.txt", "register.py")

# seconds each step took in this process: (step, seconds), in order
TIMINGS: list[tuple[str, float]] = []


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        TIMINGS.append((step, time.monotonic() - started))
        log.info("%s: %.1f s", step, TIMINGS[-1][1])


def run(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stdout.decode(errors='replace')[-3000:]}"
                           f"{result.stderr.decode(errors='replace')[-3000:]}")
    return result


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made if missing), held while the block runs: a second run
    that wants the same cache entry waits for the first one and then finds it made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME: not a Debian host?")


def apt_sources(codename: str) -> list[str]:
    """One-line `deb URI SUITE COMPONENTS` entries of apt's own sources that serve this Debian
    release (the suite itself, -updates, -security), deb822 and one-line files alike: the mirror
    the host uses, so the root filesystem comes from where apt already gets packages."""
    stanzas: list[dict[str, str]] = []
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in files:
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() != "no" and "deb" in fields.get("types", "").split():
                stanzas.append(fields)
    lines = []
    for fields in stanzas:
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    list_files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in list_files:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] == ["deb"]:
                    words = [w for w in words if not w.startswith("[")]  # options such as [arch=...]
                    lines.append(" ".join(words))
    wanted = {codename, f"{codename}-updates", f"{codename}-security"}
    chosen = [line for line in lines if line.split()[2] in wanted]
    if not any(line.split()[2] == codename for line in chosen):
        raise RuntimeError(f"apt's sources name no mirror for Debian {codename}")
    return sorted(set(chosen), key=chosen.index)


def base_recipe() -> dict:
    codename = host_codename()
    return {"tool": "mmdebstrap", "variant": "essential", "suite": codename,
            "sources": apt_sources(codename), "packages": list(BASE_PACKAGES),
            "dpkg_excludes": list(DPKG_EXCLUDES), "dpkg_includes": list(DPKG_INCLUDES),
            "hooks": MMDEBSTRAP_HOOKS, "path": BASE_PATH, "arch": platform.machine()}


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def base_tarball() -> Path:
    """The cached root filesystem (a tar file), made first if missing."""
    recipe = base_recipe()
    key = recipe_key(recipe)
    tarball = CACHE / f"base-{key}.tar"
    if tarball.exists():
        return tarball
    with locked(CACHE / f"base-{key}.lock"):
        if tarball.exists():  # made by another run while this one waited for the lock
            return tarball
        partial = CACHE / f".base-{key}.{os.getpid()}.tar"
        dpkg_options = [f"--dpkgopt=path-exclude={p}" for p in recipe["dpkg_excludes"]] + \
                       [f"--dpkgopt=path-include={p}" for p in recipe["dpkg_includes"]]
        try:
            with timed("base root filesystem (mmdebstrap)"):
                run("mmdebstrap", "--quiet", "--mode=root", f"--variant={recipe['variant']}",
                    f"--include={','.join(recipe['packages'])}", f"--hook-dir={recipe['hooks']}",
                    *dpkg_options,
                    recipe["suite"], str(partial), *recipe["sources"])
            (CACHE / f"base-{key}.json").write_text(json.dumps(recipe, indent=1) + "\n")
            os.replace(partial, tarball)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return tarball


def has_image(engine: DockerEngine, reference: str) -> bool:
    return engine.docker("image", "inspect", reference, check=False).returncode == 0


def base_image(engine: DockerEngine) -> str:
    """A minimal Debian with python3 and python3-venv in `engine`, imported from the cached root
    filesystem if the engine does not have it yet; returns its name."""
    tarball = base_tarball()
    name = f"regtest/debian-python:{tarball.stem.removeprefix('base-')}"
    if not has_image(engine, name):
        with timed("docker import of the base"):
            engine.docker("import", "--change", f"ENV PATH={BASE_PATH}", str(tarball), name, timeout=600)
    return name


def wheels() -> Path:
    """Wheels of requirements.txt for this host's Python (the Debian base has the same minor
    version: it is the host's own release), built on the host and cached; returns the folder."""
    requirements = (ROOT / "requirements.txt").read_bytes()
    interpreter = f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"
    key = hashlib.sha256(requirements + interpreter.encode()).hexdigest()[:16]
    folder = CACHE / f"wheels-{key}"
    if folder.exists():
        return folder
    with locked(CACHE / f"wheels-{key}.lock"):
        if folder.exists():
            return folder
        partial = Path(tempfile.mkdtemp(prefix=f".wheels-{key}.", dir=CACHE))
        try:
            with timed("wheels (pip wheel)"):
                run(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--no-cache-dir", "-r", str(ROOT / "requirements.txt"), "-w", str(partial))
            partial.chmod(0o755)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def build_context(directory: Path) -> Path:
    """The Dockerfile's build context: the repository files it needs, and wheels/.

    A context of its own rather than the work tree with a wheels/ folder in it: the suite never
    writes into the repository (two sessions would race on wheels/, and a stray wheels/ would be
    sent by a developer's `docker build .`)."""
    for name in CONTEXT_FILES:
        shutil.copy2(ROOT / name, directory / name)
    shutil.copytree(wheels(), directory / "wheels")
    return directory


def buildkit(engine: DockerEngine) -> dict:
    """The engine's environment with BuildKit on: what `docker build` uses by default since
    Docker 23, and some 7 times faster than the classic builder on the test engines' vfs storage
    (which copies the whole root filesystem for every instruction, LABEL and ENV included)."""
    return {**engine.env, "DOCKER_BUILDKIT": "1"}


# (engine socket, tag) -> (what it was built from, image id): a second caller in the same process
# (another suite's session fixture) gets the image built already instead of a second build.
_built: dict[tuple[str, str], tuple[str, str]] = {}


def _inputs(base: str) -> str:
    digest = hashlib.sha256(base.encode())
    for name in CONTEXT_FILES:
        digest.update((ROOT / name).read_bytes())
    digest.update(str(wheels()).encode())
    return digest.hexdigest()


def registrar_image(engine: DockerEngine, tag: str = IMAGE_TAG) -> str:
    """The registrar's image built in `engine` from the repository's Dockerfile on the Debian
    base, with the wheels (no network); returns `tag`. Built once per engine and inputs."""
    base = base_image(engine)
    inputs = _inputs(base)
    done = _built.get((engine.host, tag))
    if done and done[0] == inputs and has_image(engine, tag) and \
            engine.out("image", "inspect", "--format", "{{.Id}}", tag) == done[1]:
        return tag
    with tempfile.TemporaryDirectory(prefix="regtest-image-") as directory:
        context = build_context(Path(directory))
        with timed("docker build of the registrar image"):
            run(docker_cli(), "build", "--quiet", "--build-arg", f"BASE_IMAGE={base}", "-t", tag,
                str(context), env=buildkit(engine))
    _built[(engine.host, tag)] = (inputs, engine.out("image", "inspect", "--format", "{{.Id}}", tag))
    return tag


def load_into(src: DockerEngine, dst: DockerEngine, tag: str = IMAGE_TAG) -> str:
    """Copy image `tag` from engine `src` into engine `dst` (`docker save | docker load`), unless
    `dst` already has that very image; returns `tag`."""
    wanted = src.out("image", "inspect", "--format", "{{.Id}}", tag)
    if has_image(dst, tag) and dst.out("image", "inspect", "--format", "{{.Id}}", tag) == wanted:
        return tag
    with timed(f"docker save | docker load of {tag}"):
        save = subprocess.Popen([docker_cli(), "save", tag], env=src.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            load = subprocess.run([docker_cli(), "load", "--quiet"], env=dst.env, stdin=save.stdout,
                                  capture_output=True, timeout=600)
        finally:
            save.stdout.close()
            save_error = save.stderr.read()
            save.wait(60)
        if save.returncode != 0 or load.returncode != 0:
            raise RuntimeError(f"docker save {tag} | docker load failed ({save.returncode}, "
                               f"{load.returncode}): {save_error.decode(errors='replace')}"
                               f"{load.stderr.decode(errors='replace')}")
    got = dst.out("image", "inspect", "--format", "{{.Id}}", tag)
    if got != wanted:
        raise RuntimeError(f"docker load gave {got}, not {wanted}")
    return tag


def image_size(engine: DockerEngine, tag: str = IMAGE_TAG) -> int:
    """The image's size in bytes, as `docker image inspect` reports it (all its layers)."""
    return int(engine.out("image", "inspect", "--format", "{{.Size}}", tag))


if __name__ == "__main__":
    # Times each step in an engine of its own: python tests/image.py [--cold]
    # (--cold: with an empty cache of its own, left alone by and leaving alone the shared one; the
    # engine is new every time, so the import and the build always run)
    import testbed
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cold_cache = None
    if "--cold" in sys.argv:
        cold_cache = CACHE = Path(tempfile.mkdtemp(prefix="regtest-cold-cache-"))
    workdir = testbed.make_workdir()
    engine = testbed.DockerEngine(workdir, name="rtAimg")
    try:
        engine.start()
        with timed("total"):
            registrar_image(engine)
        print(f"image size: {image_size(engine) / 1e6:.1f} MB")
        print(engine.out("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE_TAG))
        for step, seconds in TIMINGS:
            print(f"{seconds:7.1f} s  {step}")
    finally:
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if cold_cache:
            shutil.rmtree(cold_cache, ignore_errors=True)
