"""This host's scope (register.HostScope): the one write guard, over every key space the host owns.

Pure: the host index `<prefix>/<HOST_IP>`, and a second index of the shape the next issue brings
(`<services-prefix>/<name>/<HOST_IP>/<container-id>`, its space written `/services/*/<HOST_IP>`):
what passes, what is refused, what a read covers and keeps.
"""
from __future__ import annotations

import pytest

import register

HOST = "10.0.0.1"
ID = "a" * 64
SCOPE = register.HostScope("/registered", HOST, indexes=["/services/*/10.0.0.1"])
FLAT = register.HostScope("/registered", HOST, flat=True, indexes=["/services/*/10.0.0.1"])


@pytest.mark.parametrize("key", [f"/registered/{HOST}/regtest::busybox:1/{ID}", f"/services/web/{HOST}/{ID}",
                                 f"/services/db-main_2/{HOST}/{ID}"])
def test_a_key_below_one_of_the_spaces_passes_as_it_is(key):
    assert SCOPE.check(key) == key
    assert SCOPE.owns(key)


@pytest.mark.parametrize("key", [
    f"/registered/{HOST}1/x/{ID}",  # a neighbour whose address extends ours
    f"/services/web/{HOST}1/{ID}",
    f"/services/web/10.0.0.2/{ID}",  # another host's part of the index
    f"/services/{HOST}/{ID}",  # no name: one segment short of the space
    f"/services/web/extra/{HOST}/{ID}",
    f"/services/web/{HOST}",  # the space itself
    f"/services/../{HOST}/{ID}", f"/services//{HOST}/{ID}", f"/services/./{HOST}/{ID}",
    f"/services/web/{HOST}/../../x", f"/registered/{HOST}/../x", f"/registered/{HOST}/a//b",
    f"/services/a b/{HOST}/{ID}",  # a name this service never makes
    "/services/x", "/elsewhere", "/registered", f"/registered/{HOST}",
])
def test_a_key_outside_every_space_is_refused(key):
    with pytest.raises(register.OutsideScope):
        SCOPE.check(key)


def test_only_the_host_key_itself_passes_and_only_when_asked_for():
    assert SCOPE.check(f"/registered/{HOST}", host_dir=True) == f"/registered/{HOST}"
    with pytest.raises(register.OutsideScope):
        SCOPE.check("/services/*/10.0.0.1", host_dir=True)  # a pattern is no key to write


def test_a_found_key_may_hold_any_character_and_is_sent_exactly():
    odd = f"/services/caf\u00e9 bar/{HOST}/{ID}"
    assert SCOPE.check(odd, found=True) == f"/services/caf%C3%A9%20bar/{HOST}/{ID}"
    assert FLAT.check(odd, found=True) == odd  # v3: bytes, never in a URL
    assert SCOPE.owns(odd) and not SCOPE.owns(f"/services/../{HOST}/{ID}")


def test_a_read_covers_the_subtree_above_each_space_and_keeps_this_hosts_keys():
    assert SCOPE.reads() == (f"/registered/{HOST}", "/services")
    found = [f"/services/web/{HOST}/{ID}", f"/services/web/10.0.0.2/{ID}", f"/services/web/{HOST}1/{ID}",
             f"/services/web/{HOST}", "/services/web", f"/registered/{HOST}/img/{ID}"]
    assert [key for key in found if SCOPE.owns(key)] == [f"/services/web/{HOST}/{ID}",
                                                         f"/registered/{HOST}/img/{ID}"]
    assert register.HostScope("/registered", HOST).reads() == (f"/registered/{HOST}",)


@pytest.mark.parametrize("index", ["/services/../x", "/services//x", "services/*/x", "/a b/*"])
def test_an_index_space_that_is_no_clean_path_is_refused(index):
    with pytest.raises(register.OutsideScope):
        register.HostScope("/registered", HOST, indexes=[index])
