# docker-etcd-register as a container: run it with the host's Docker socket and host networking.
#   docker build -t docker-etcd-register .
#   docker run -d --name docker-etcd-register --restart always --net host \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -e ETCD_ENDPOINT=http://10.0.0.1:2379 -e HOST_IP=10.0.0.1 docker-etcd-register
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY register.py .
# register.py handles SIGTERM itself (stops within 2 s, records left in place)
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-u", "/app/register.py"]
