"""The record logic, fed with `docker inspect` output captured from a real engine.

tests/fixtures/inspect/*.json were written by tests/capture_fixtures.py; each keeps the `docker run`
command line that made the container. Expected keys and values are written out in full: they are
the registry contract (docs/architecture.md, "The registry contract"), byte for byte.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import register
from register import RecordError, desired_entry, image_key

FIXTURES = Path(__file__).parent / "fixtures" / "inspect"
HOST = "10.0.0.1"
PREFIX = "/registered"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())["inspect"]


def entry(name: str, host: str = HOST):
    return desired_entry(fixture(name), host, PREFIX)


def test_wildcard_bindings_advertise_host_ip_and_ipv4_ipv6_twins_merge_tcp_and_udp():
    # docker run -p 80 -p 53/udp: Docker reports 0.0.0.0 and :: for each port
    e = entry("wildcard_tcp_udp")
    cid = "9fa8951b449cc4e02e9e99a91a89b9bd48c8aa01d7d0c7f4e4192a25e4d688f0"
    assert e.key == f"/registered/10.0.0.1/regtest::busybox:1/{cid}"
    assert e.value == (
        f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1",'
        '"public_port":"32768","private_port":"53","port_type":"udp"},'
        f'{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1",'
        '"public_port":"32768","private_port":"80","port_type":"tcp"}]')
    assert e.name == "wildcard_tcp_udp"
    assert e.image == "regtest/busybox:1"
    assert e.ports == "53/udp=10.0.0.1:32768,80/tcp=10.0.0.1:32768"


def test_specific_addresses_are_advertised_as_they_are_and_loopback_is_skipped():
    # -p 192.0.2.10:8080:80 -p 127.0.0.1:8081:80 -p [::1]:8082:80 -p [fd00::10]:8083:80
    e = entry("specific_addresses")
    cid = "067ce02539f012f380d440ae67ffce1248bcbf969d53235bc1372cd34b6e3258"
    assert e.value == (
        f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"192.0.2.10",'
        '"public_port":"8080","private_port":"80","port_type":"tcp"},'
        f'{{"container":"{cid}","image":"regtest::busybox:1","ip":"fd00::10",'
        '"public_port":"8083","private_port":"80","port_type":"tcp"}]')


def test_a_container_bound_to_loopback_only_has_no_key():
    assert entry("loopback_only") is None


def test_several_ports_are_one_key_sorted_by_port_number_then_type_then_public_port():
    # -p 8443:443 -p 8180:80 -p 9000:9000/udp -p 8181:80 -p 5353:53/udp -p 5354:53
    e = entry("several_ports")
    records = json.loads(e.value)
    assert [(r["private_port"], r["port_type"], r["public_port"]) for r in records] == [
        ("53", "tcp", "5354"), ("53", "udp", "5353"), ("80", "tcp", "8180"), ("80", "tcp", "8181"),
        ("443", "tcp", "8443"), ("9000", "udp", "9000")]
    cid = "0606935f57cad75a970dafe3cf08a87380e6a0fcca0b30d978398644b13306b7"
    assert e.value.startswith(
        f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"5354",'
        '"private_port":"53","port_type":"tcp"},')
    assert " " not in e.value  # compact


def test_twins_on_different_host_ports_stay_two_records():
    # -p 0.0.0.0:8085:80 -p [::]:8086:80
    records = json.loads(entry("twins_on_different_ports").value)
    assert [(r["ip"], r["public_port"]) for r in records] == [("10.0.0.1", "8085"), ("10.0.0.1", "8086")]


def test_publish_all_registers_the_random_host_ports():
    # -P --expose 9090 --expose 7070/udp (the image exposes 80)
    e = entry("publish_all")
    cid = "4dc86504f19ee600daee938f429c3c5edb9bc2e44c9f920f04a90931b72e5b4c"
    assert e.value == (
        f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"32770",'
        '"private_port":"80","port_type":"tcp"},'
        f'{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"32769",'
        '"private_port":"7070","port_type":"udp"},'
        f'{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"32769",'
        '"private_port":"9090","port_type":"tcp"}]')


def test_host_network_mode_publishes_the_exposed_ports_directly():
    # --network host --expose 8090/udp (the image exposes 80)
    e = entry("host_network")
    cid = "e19e619e7f7dc727954d0300bc2c6d9be86f5f195bd86e3017cea015e143ce2e"
    assert e.value == (
        f'[{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"80",'
        '"private_port":"80","port_type":"tcp"},'
        f'{{"container":"{cid}","image":"regtest::busybox:1","ip":"10.0.0.1","public_port":"8090",'
        '"private_port":"8090","port_type":"udp"}]')


def test_a_container_without_published_ports_has_no_key():
    assert entry("no_published_port") is None


def test_an_exited_container_has_no_key():
    assert entry("exited") is None


def test_a_paused_container_counts_as_running():
    e = entry("paused")
    assert e.key == ("/registered/10.0.0.1/regtest::busybox:1/"
                     "14a492c50464a95a493652dc9f641e32239f410a74320ddb755e062e68bde24d")
    assert json.loads(e.value)[0]["public_port"] == "8093"


@pytest.mark.parametrize(("labels", "registered"), [
    ({"register.ignore": "true"}, False),
    ({"register.ignore": "TRUE", "other": "x"}, False),  # the registrar's own image says "true"
    ({"register.ignore": " True "}, False),
    ({"register.ignore": "false"}, True),
    ({"register.ignore": "yes"}, True),  # only "true" ignores: no guessing at other words
    ({"register.ignore": ""}, True),
    ({"register.ignore": None}, True),
    ({"Register.Ignore": "true"}, True),  # label keys are case-sensitive in Docker
    ({}, True),
    (None, True),  # Docker reports no labels as null
])
def test_the_ignore_label(labels, registered):
    inspect = fixture("wildcard_tcp_udp")
    inspect["Config"]["Labels"] = labels
    assert (desired_entry(inspect, HOST, PREFIX) is not None) is registered
    assert register.ignored(inspect) is not registered


def test_a_restarting_container_has_no_key():
    inspect = fixture("wildcard_tcp_udp")
    inspect["State"]["Restarting"] = True
    assert desired_entry(inspect, HOST, PREFIX) is None


@pytest.mark.parametrize(("name", "image_part"), [
    ("image_registry_port", "example.org:5000::team::app:1.2"),
    ("image_nested_no_tag", "localhost:5000::a::b::c::app:latest"),
    ("image_digest",
     "localhost:5000::team::app@sha256:baa318cb211da17e4f68b86d17beb2cee0a0a1c84ce281656314b8d62bdbebce"),
    ("image_short_id", "bcd6753c7ae6:latest"),
    ("image_full_id", "sha256:bcd6753c7ae6139550f28452e9a218fadc0b68f65eecb73308884a039720dc0c"),
])
def test_image_names_in_keys_and_values(name, image_part):
    inspect = fixture(name)
    e = desired_entry(inspect, HOST, PREFIX)
    assert e.key == f"/registered/10.0.0.1/{image_part}/{inspect['Id']}"
    assert json.loads(e.value)[0]["image"] == image_part
    assert e.image == inspect["Config"]["Image"]


@pytest.mark.parametrize(("reference", "expected"), [
    ("busybox", "busybox:latest"),
    ("busybox:1.36", "busybox:1.36"),
    ("library/busybox", "library::busybox:latest"),
    ("example.org:5000/team/app:1.2", "example.org:5000::team::app:1.2"),
    ("example.org:5000/team/app", "example.org:5000::team::app:latest"),
    ("app@sha256:" + "a" * 64, "app@sha256:" + "a" * 64),
    ("example.org:5000/app:1@sha256:" + "b" * 64, "example.org:5000::app:1@sha256:" + "b" * 64),
    ("sha256:" + "c" * 64, "sha256:" + "c" * 64),
    ("0e69c0e47e1f", "0e69c0e47e1f:latest"),
])
def test_image_key(reference, expected):
    assert image_key(reference) == expected


def test_ipv6_host_ip_in_key_and_records():
    e = entry("wildcard_tcp_udp", host="fd00::1")
    assert e.key.startswith("/registered/fd00::1/regtest::busybox:1/")
    assert {r["ip"] for r in json.loads(e.value)} == {"fd00::1"}
    assert e.ports == "53/udp=[fd00::1]:32768,80/tcp=[fd00::1]:32768"


def test_the_same_container_always_gives_the_same_bytes():
    inspect = fixture("several_ports")
    shuffled = copy.deepcopy(inspect)
    ports = shuffled["NetworkSettings"]["Ports"]
    shuffled["NetworkSettings"]["Ports"] = {k: list(reversed(v)) for k, v in reversed(ports.items())}
    assert desired_entry(shuffled, HOST, PREFIX).value == desired_entry(inspect, HOST, PREFIX).value


def test_an_empty_binding_address_is_a_wildcard():
    inspect = fixture("wildcard_tcp_udp")
    inspect["NetworkSettings"]["Ports"] = {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}
    assert json.loads(desired_entry(inspect, HOST, PREFIX).value) == [
        {"container": inspect["Id"], "image": "regtest::busybox:1", "ip": "10.0.0.1",
         "public_port": "8080", "private_port": "80", "port_type": "tcp"}]


# Data Docker reports oddly: the container is treated as publishing nothing, with the reason.
@pytest.mark.parametrize(("change", "message"), [
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": [{"HostIp": "0.0.0.0"}]}),
     "host port of 80/tcp None is not a port number"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": [{"HostIp": "", "HostPort": ""}]}),
     "host port of 80/tcp '' is not a port number"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": [{"HostIp": "", "HostPort": "70000"}]}),
     "host port of 80/tcp '70000' is not a port number"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": [{"HostIp": "bogus", "HostPort": "1"}]}),
     "binding address 'bogus' is not an IP address"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80": [{"HostIp": "", "HostPort": "1"}]}),
     "port '80' is not of the form 80/tcp"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": "0.0.0.0:1"}),
     "bindings of 80/tcp are not a list"),
    (lambda i: i["NetworkSettings"]["Ports"].update({"80/tcp": ["0.0.0.0:1"]}),
     "a binding of 80/tcp is not a mapping"),
    (lambda i: i["NetworkSettings"].update({"Ports": ["80/tcp"]}),
     "NetworkSettings.Ports is not a mapping"),
    (lambda i: i["Config"].update({"Image": ""}), "image reference '' is empty or not text"),
    (lambda i: i["Config"].update({"Image": None}), "image reference None is empty or not text"),
    (lambda i: i["Config"].update({"Image": "bad image?"}),
     "image reference 'bad image?' has characters that cannot be part of a key"),
    (lambda i: i.update({"Id": "9fa8951b449c"}), "container id '9fa8951b449c' is not 64 hex digits"),
    (lambda i: i["Config"].update({"Labels": ["register.ignore=true"]}),
     "its labels are a list, not a mapping"),
])
def test_odd_data_is_an_error_naming_what_is_wrong(change, message):
    inspect = fixture("wildcard_tcp_udp")
    change(inspect)
    with pytest.raises(RecordError) as raised:
        desired_entry(inspect, HOST, PREFIX)
    assert str(raised.value) == message


def test_host_mode_with_odd_exposed_ports_is_an_error():
    inspect = fixture("host_network")
    inspect["Config"]["ExposedPorts"] = {"http": {}}
    with pytest.raises(RecordError, match=r"^port 'http' is not of the form 80/tcp$"):
        desired_entry(inspect, HOST, PREFIX)


def test_key_container_id():
    assert register.key_container_id("/registered/10.0.0.1/busybox:latest/" + "a" * 64) == "a" * 64


def test_since_from_event_time():
    assert register.since_from({"time": 1700000000, "timeNano": 1700000000012345678}) == \
        "1700000000.012345678"
    assert register.since_from({"time": 1700000000}) == "1700000000"
    assert register.since_from({}) is None


def test_describe_record_for_removal_logs():
    key = "/registered/10.0.0.1/regtest::busybox:1/" + "a" * 64
    value = ('[{"container":"' + "a" * 64 + '","image":"regtest::busybox:1","ip":"fd00::1",'
             '"public_port":"8080","private_port":"80","port_type":"tcp"}]')
    assert register.describe_record(key, value) == \
        f"record of aaaaaaaaaaaa image regtest::busybox:1 ports 80/tcp=[fd00::1]:8080 ({key})"
    for odd in ("x", "[]", "{}", "[1]", '[{"container":"a"}]', "null"):
        assert register.describe_record(key, odd) == f"key {key}"


# -- records from the container list (a full reconcile's shortcut) -----------------------------

SUMMARY = {"Id": "a" * 64, "Names": ["/web"], "Image": "regtest/busybox:1", "ImageID": "sha256:" + "b" * 64,
           "State": "paused", "HostConfig": {"NetworkMode": "bridge"}, "Labels": {"register.ignore": "true"},
           "Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
                     {"IP": "::", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
                     {"PrivatePort": 9090, "Type": "tcp"}]}


def test_a_container_list_entry_gives_what_the_records_need():
    assert register.inspect_from_summary(SUMMARY) == {
        "Id": "a" * 64, "Name": "/web", "State": {"Running": True, "Restarting": False},
        "Config": {"Image": "regtest/busybox:1", "Labels": {"register.ignore": "true"}},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"},
                                                 {"HostIp": "::", "HostPort": "8080"}],
                                      "9090/tcp": None}}}
    # the list says enough to leave the registrar's own container out, without an inspect
    assert desired_entry(register.inspect_from_summary(SUMMARY), HOST, PREFIX) is None
    assert desired_entry(register.inspect_from_summary({**SUMMARY, "Labels": {}}), HOST, PREFIX) is not None


@pytest.mark.parametrize("change", [
    {"HostConfig": {"NetworkMode": "host"}},  # the records come from exposed ports the list omits
    {"Image": "sha256:" + "b" * 64},  # the list shows the image id: the tag may have moved
    {"Image": None},
    {"State": None},
    {"HostConfig": None},
    {"Ports": [{"IP": "0.0.0.0", "PrivatePort": "eighty", "PublicPort": 8080, "Type": "tcp"}]},
    {"Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": None, "Type": "tcp"}]},
    {"Ports": ["80/tcp"]},
], ids=["host-mode", "image-id", "no-image", "no-state", "no-host-config", "odd-private-port",
        "odd-public-port", "odd-port-entry"])
def test_a_list_entry_that_cannot_tell_means_an_inspect(change):
    assert register.inspect_from_summary({**SUMMARY, **change}) is None


# -- the record size limit ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_the_record_size_is_computed_exactly_without_making_the_record(name):
    e = entry(name)
    if e is None:
        return  # no record: nothing to measure (those fixtures are checked above)
    records = register.port_records(fixture(name), HOST)
    assert register.record_bytes(records, e.container_id, e.key.split("/")[-2]) == len(e.value)


def test_a_record_over_the_limit_is_refused_before_it_is_made():
    data = fixture("host_network")
    data["Config"]["ExposedPorts"] = {f"{port}/{kind}": {} for port in range(1, 3001)
                                      for kind in ("tcp", "udp")}
    whole = desired_entry(data, HOST, PREFIX)
    assert len(whole.value) > 512 * 1024
    assert desired_entry(data, HOST, PREFIX, len(whole.value)) == whole  # the limit itself is allowed
    with pytest.raises(register.RecordTooLarge) as raised:
        desired_entry(data, HOST, PREFIX, len(whole.value) - 1)
    assert str(raised.value) == (f"its record would take {len(whole.value)} bytes for 6000 published "
                                 f"port(s), over REGISTER_MAX_RECORD_BYTES={len(whole.value) - 1}")
    assert whole.ports.endswith(",... (6000 ports)") and whole.ports.count("=") == register.LOGGED_PORTS
    # counted from the port names alone (no 6,000 records made), exactly as the records would be
    assert register._host_mode_size(data, HOST, data["Id"]) == (len(whole.value), 6000)
    data["Config"]["ExposedPorts"]["0080/tcp"] = {}  # another spelling: the records decide
    assert register._host_mode_size(data, HOST, data["Id"]) is None
    with pytest.raises(register.RecordTooLarge, match=r"for 6000 published port\(s\)"):
        desired_entry(data, HOST, PREFIX, len(whole.value) - 1)


# -- which events say what --------------------------------------------------------------------

CID = "c" * 64


@pytest.mark.parametrize(("event", "target"), [
    ({"Type": "container", "Action": "start", "id": CID, "Actor": {"ID": CID}}, (CID, False)),
    ({"Type": "container", "Action": "die", "Actor": {"ID": CID}}, (CID, True)),
    ({"Type": "container", "Action": "destroy", "Actor": {"ID": CID}}, (CID, True)),
    ({"status": "start", "id": CID}, (CID, False)),  # an engine too old to say Type and Action
    # a network change says nothing of whether the container runs, only that its ports may differ
    ({"Type": "network", "Action": "connect", "Actor": {"ID": "n" * 64, "Attributes": {
        "container": CID, "name": "bridge", "type": "bridge"}}}, (CID, None)),
    ({"Type": "network", "Action": "disconnect", "Actor": {"ID": "n" * 64, "Attributes": {
        "container": CID, "name": "bridge", "type": "bridge"}}}, (CID, None)),
    # the filter lets these through too (it matches actions of any type): they change no record
    ({"Type": "network", "Action": "destroy", "Actor": {"ID": "n" * 64, "Attributes": {"name": "n1"}}}, None),
    ({"Type": "network", "Action": "connect", "Actor": {"ID": "n" * 64, "Attributes": {}}}, None),
    ({"Type": "container", "Action": "pause", "Actor": {"ID": CID}}, None),
    ({"Type": "container", "Action": "start", "Actor": {"ID": 5}}, None),
])
def test_which_events_mark_which_container(event, target):
    assert register.event_container(event) == target
