# docker-etcd-register as a container: it needs the host's Docker socket and host networking.
#   docker build -t docker-etcd-register .
#   docker run -d --name docker-etcd-register --restart always --net host \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -e ETCD_ENDPOINT=http://10.0.0.1:2379 -e HOST_IP=10.0.0.1 docker-etcd-register
# (register.service runs it that way under systemd or fleet.)
#
# BASE_IMAGE: any Debian-like image with python3 (3.9 or later) and its venv module. The default is
# the official Python image on the Debian release the test suite builds on; the suite uses a
# Debian made with mmdebstrap (python3, python3-venv), as no image registry is reachable there.
# wheels/: when the build context has wheels in it (`pip wheel -r requirements.txt -w wheels`),
# the pins are installed from them with no network access; without them, from PyPI.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="docker-etcd-register" \
      org.opencontainers.image.description="Keeps etcd's /registered/<host-ip>/ tree equal to the containers running on this Docker host" \
      org.opencontainers.image.version="1.0.0" \
      org.opencontainers.image.licenses="MIT" \
      register.ignore="true"

# The dependencies live in a venv: Debian's python3 refuses installs into the system (PEP 668),
# and the official image's python is happy with a venv too. PATH puts the venv's python3 first,
# for the entrypoint and the health check alike.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    REGISTER_HEALTH_ADDR=127.0.0.1:9109

# The pinned requirements in a layer of their own, before register.py: changing the code does not
# reinstall them. "wheel[s]" is a pattern so that the build works without a wheels/ folder too.
COPY requirements.txt wheel[s] /tmp/requirements/
RUN python3 -m venv /opt/venv \
    && if ls /tmp/requirements/*.whl >/dev/null 2>&1; \
       then set -- --no-index --find-links /tmp/requirements; fi \
    && /opt/venv/bin/python3 -m pip install --no-cache-dir --disable-pip-version-check \
       "$@" -r /tmp/requirements/requirements.txt \
    && rm -rf /tmp/requirements

COPY register.py /app/register.py

# User: root, on purpose. The registrar needs the Docker socket, and access to that socket is
# root on the host whatever the user inside the container: a non-root user in the socket's group
# buys no isolation (it can start a privileged container), and the socket's group id differs from
# host to host, so every deployment would have to pass `--group-add <gid>` or fail with
# "permission denied". Restrict the container at run time instead (e.g. --read-only,
# --cap-drop ALL, --security-opt no-new-privileges).

# The health server answers on REGISTER_HEALTH_ADDR (with --net host: the host's loopback).
# Every 10 s, since Docker's first check comes one interval after the start (engines before 25
# know no --start-interval) and a check is one short python3 process; 5 s for an answer that
# takes milliseconds on an idle host; failures in the first 30 s do not count (Docker or etcd
# may still be coming up with the host), and 3 failures in a row (about 30 s) mean unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "/app/register.py", "healthcheck"]

# register.py handles SIGTERM itself: it stops within about 2 s and leaves the records in place
# (they expire with their TTL unless a registrar comes back), so `docker stop`'s default 10 s
# is enough.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-u", "/app/register.py"]
