#!/bin/bash
# Provisions one node of the Vagrant cluster (run as root by the Vagrantfile's shell provisioner,
# again on every `vagrant provision`):
#   provision.sh NAME IP INITIAL_CLUSTER ETCD_ENDPOINTS ETCD_API SOURCE_DIR
# - this node's etcd member: /etc/default/etcd and etcd.service (etcd 3.5 in Docker, v2 API on);
# - the registrar: the image built from SOURCE_DIR (the repository files the Vagrantfile uploaded),
#   its settings in /etc/docker-etcd-register/env (which register.service reads and passes on to
#   the container whole), and the repository's register.service.
# tests/test_deploy_files.py starts a real three-member etcd from etcd_settings' output.
set -euo pipefail

REGISTER_IMAGE=docker-etcd-register:latest
HEALTH_ADDR=127.0.0.1:9109

# etcd_settings NAME IP INITIAL_CLUSTER: the member's ETCD_* settings, one VAR=value a line (a
# format both systemd's EnvironmentFile= and `docker run --env-file` read).
etcd_settings() {
    local name="$1" ip="$2" cluster="$3"
    cat <<EOF
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd
ETCD_LISTEN_PEER_URLS=http://$ip:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$ip:2380
ETCD_LISTEN_CLIENT_URLS=http://$ip:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ip:2379
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_TOKEN=docker-etcd-register-vagrant
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_ENABLE_V2=true
EOF
}

# registrar_settings IP ETCD_ENDPOINTS ETCD_API: the registrar's settings (register.service gives
# this file to systemd and to `docker run --env-file`).
registrar_settings() {
    local ip="$1" endpoints="$2" api="$3"
    cat <<EOF
HOST_IP=$ip
ETCD_ENDPOINT=$endpoints
ETCD_API=$api
REGISTER_HEALTH_ADDR=$HEALTH_ADDR
EOF
}

main() {
    if [ "$#" -ne 6 ]; then
        echo "usage: $0 NAME IP INITIAL_CLUSTER ETCD_ENDPOINTS ETCD_API SOURCE_DIR" >&2
        exit 2
    fi
    local name="$1" ip="$2" cluster="$3" endpoints="$4" api="$5" source_dir="$6"

    mkdir -p /etc/default
    etcd_settings "$name" "$ip" "$cluster" >/etc/default/etcd
    install -m 0644 "$source_dir/vagrant/etcd.service" /etc/systemd/system/etcd.service
    mkdir -p /etc/docker-etcd-register
    registrar_settings "$ip" "$endpoints" "$api" >/etc/docker-etcd-register/env

    docker build --tag "$REGISTER_IMAGE" "$source_dir"
    install -m 0644 "$source_dir/register.service" /etc/systemd/system/register.service

    systemctl daemon-reload
    # etcd answers once two of the three members run; the registrar retries until then.
    systemctl enable --now etcd.service
    systemctl enable register.service
    systemctl restart register.service
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
