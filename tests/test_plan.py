"""The plan (register.plan): from the records wanted and the records found to the deletes and
puts that make the second equal to the first. Pure: no Docker, no etcd, no clock.

Exact plans for each case the reconciler meets, then every combination of what is found, what
is wanted and what was known, applied to a dictionary and checked against the contract: what is
wanted is there byte for byte, what is not wanted is gone, a container Docker could not describe
keeps what it had, and nothing right is written again.
"""
from __future__ import annotations

import itertools

import pytest

import register
from register import UNKNOWN, Entry, Plan, Registration, Removal, plan

PREFIX, HOST = "/registered", "10.0.0.1"
A, B, C = "a" * 64, "b" * 64, "c" * 64


def key(cid: str, image: str = "web:1") -> str:
    return f"{PREFIX}/{HOST}/{image}/{cid}"


def value(cid: str, port: int = 8080, image: str = "web:1") -> str:
    return (f'[{{"container":"{cid}","image":"{image}","ip":"{HOST}","public_port":"{port}",'
            f'"private_port":"80","port_type":"tcp"}}]')


def entry(cid: str, port: int = 8080, image: str = "web:1", extra: tuple = ()) -> Entry:
    return Entry(cid, f"name-{cid[:1]}", image, ((key(cid, image), value(cid, port, image)), *extra),
                 f"80/tcp={HOST}:{port}")


def test_nothing_wanted_and_nothing_found_is_an_empty_plan():
    assert plan({}, {}, {}) == Plan((), (), (), frozenset())


def test_a_new_container_is_registered():
    want = entry(A)
    result = plan({A: want}, {}, {})
    assert result == Plan((), (Registration(want, (key(A),), existed=False),), (), frozenset())
    assert result.puts == [(key(A), value(A))] and result.deletes == []


def test_a_record_already_right_is_left_untouched():
    want = entry(A)
    assert plan({A: want}, {key(A): value(A)}, {A: want}) == Plan((), (), (want,), frozenset())


def test_a_changed_value_is_written_again_as_an_update():
    want = entry(A, port=9090)
    result = plan({A: want}, {key(A): value(A)}, {A: entry(A)})
    assert result.registrations == (Registration(want, (key(A),), existed=True),)
    assert result.puts == [(key(A), value(A, 9090))] and result.removals == ()


def test_a_detached_key_is_written_again_even_when_its_value_is_right():
    want = entry(A)
    result = plan({A: want}, {key(A): value(A)}, {A: want}, detached={key(A)})
    assert result.registrations == (Registration(want, (key(A),), existed=True),)


@pytest.mark.parametrize(("running", "why"), [
    (False, "container stopped or gone"),
    (True, "container no longer runs or publishes a port"),
])
def test_a_known_container_that_wants_no_record_is_removed_with_why(running, why):
    had = entry(A)
    result = plan({A: None}, {key(A): value(A)}, {A: had}, running=[A] if running else [])
    assert result == Plan((Removal((key(A),), had, why),), (), (), frozenset())
    assert result.deletes == [key(A)]


def test_a_key_that_changed_goes_and_the_new_one_is_registered():
    had, want = entry(A), entry(A, image="web:2")
    result = plan({A: want}, {key(A): value(A)}, {A: had}, running=[A])
    assert result.removals == (Removal((key(A),), had, "key changed"),)
    assert result.registrations == (Registration(want, (key(A, "web:2"),), existed=False),)


def test_a_stale_key_nobody_knew_is_removed_and_described():
    result = plan({}, {key(B): value(B)}, {})
    assert result.removals == (Removal((key(B),), None, register.describe_record(key(B), value(B))),)
    assert result.removals[0].why == (f"record of {B[:12]} image web:1 ports 80/tcp={HOST}:8080 "
                                      f"({key(B)})")


def test_junk_found_is_removed_as_a_key():
    junk = f"{PREFIX}/{HOST}/junk"
    result = plan({}, {junk: "not json"}, {})
    assert result.removals == (Removal((junk,), None, f"key {junk}"),)


def test_a_container_docker_could_not_describe_keeps_its_records():
    result = plan({A: UNKNOWN, B: None}, {key(A): value(A), key(B): value(B)}, {A: entry(A), B: entry(B)})
    assert result.held == frozenset({A})
    assert result.deletes == [key(B)] and result.puts == []
    assert result.keep({key(A): value(A), key(B): value(B)}) == {key(A)}


def test_an_event_plan_sees_only_the_containers_it_names():
    # an event for A: what is found is what is known of A, so B's key is not in question
    had = entry(A)
    result = plan({A: None}, dict(had.records), {A: had, B: entry(B)})
    assert result.deletes == [key(A)]


def test_records_under_two_indexes_are_planned_key_by_key_and_logged_as_one_container():
    second = (f"/services/web/{HOST}/{A}", "{}")
    want = entry(A, extra=(second,))
    found = {key(A): value(A)}
    result = plan({A: want}, found, {A: entry(A)})
    assert result.registrations == (Registration(want, (second[0],), existed=True),)
    assert result.puts == [second]
    gone = plan({A: None}, {key(A): value(A), second[0]: "{}"}, {A: want})
    assert gone.removals == (Removal((key(A), second[0]), want, "container stopped or gone"),)


def test_keep_is_what_is_there_once_the_plan_is_applied():
    found = {key(A): value(A), key(B): value(B)}
    result = plan({A: entry(A), B: None, C: entry(C)}, found, {B: entry(B)})
    assert result.keep(found) == {key(A), key(C)}


# -- every combination, applied ------------------------------------------------------------

FOUND = ("absent", "right", "wrong", "detached", "old key")
WANTED = ("entry", "none", "unknown")
KNOWN = ("none", "current", "old key")


def situation(found: str, wanted: str, known: str):
    want = entry(A)
    old = entry(A, image="web:0")
    records = {"absent": {}, "right": {key(A): value(A)}, "wrong": {key(A): value(A, 1)},
               "detached": {key(A): value(A)}, "old key": {old.key: old.value}}[found]
    return (records, {"entry": want, "none": None, "unknown": UNKNOWN}[wanted],
            {"none": None, "current": want, "old key": old}[known],
            {key(A)} if found == "detached" else set())


@pytest.mark.parametrize(("found", "wanted", "known"), list(itertools.product(FOUND, WANTED, KNOWN)))
def test_every_combination_converges_in_one_plan(found, wanted, known):
    records, want, had, detached = situation(found, wanted, known)
    neighbour = {key(B): value(B)}  # a container of this host that nothing changed
    all_found = {**records, **neighbour}
    result = plan({A: want, B: entry(B)}, all_found, {A: had, B: entry(B)} if had else {B: entry(B)},
                  detached=detached)
    after = dict(all_found)
    for deleted in result.deletes:
        del after[deleted]
    after.update(result.puts)
    if want is UNKNOWN:
        assert after == all_found and result.held == frozenset({A})
    elif want is None:
        assert after == neighbour
    else:
        assert after == {**dict(want.records), **neighbour}
    # nothing right is written again, nothing is deleted that stays, and keep says what is left
    written = {k for k, _ in result.puts}
    assert not written & set(result.deletes)
    assert all(all_found.get(k) != v or k in detached for k, v in result.puts)
    assert result.keep(all_found) == set(after)
    assert entry(B) in result.untouched
