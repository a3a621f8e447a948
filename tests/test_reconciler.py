"""The reconciler, under a frozen clock: its backoff schedules, heartbeat and resync timing, and its
behaviour (requeue, refusals, coalescing, a lease lost).

The reconciler is driven step by step through its public methods (step, mark_dirty, queue, status)
with a fake engine. Its timing tests (heartbeat, resync) count the requests of a registry made
for them; its behaviour (requeue, refusals, what a stopped container costs) is tested on the
verified fake (tests/memory_registry.py), which passes the contract suite of the etcd adapters.
The retry test talks to a real closed port, so the failure is a real one.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
from freezegun import freeze_time
from memory_registry import MemoryEtcd, MemoryRegistry, MemoryStore
from testbed import free_port

import register
from register import Config, Endpoint, EtcdRegistry, Reconciler, RetrySchedule, Timer


def config(ttl: int = 30, resync: int = 60, port: int = 2379) -> Config:
    return Config(etcd_endpoints=(Endpoint("http", "127.0.0.1", port),), host_ip="10.0.0.1",
                  prefix="/registered", ttl=ttl, resync=resync, log_level="info", log_format="text",
                  deregister_on_exit=False)


class FakeRegistry:
    """The registry seam (register.Registry), in memory: for the reconciler's timing alone."""
    API = 2
    LIVENESS = "host directory"
    REFRESHED = "TTL"
    host_dir = "/registered/10.0.0.1"
    endpoints = (Endpoint("http", "127.0.0.1", 2379),)
    beat_endpoint = endpoints[0]
    writes = 0

    def __init__(self):
        self.refreshes = 0
        self.dir_present = True
        self.records = {}
        self.engine_id = "engine-1"  # known: the reconciler asks Docker for it otherwise
        self.granted_new = False  # the host directory was adopted from a run before
        self.timeouts = []

    def check_api(self):
        pass

    def prepare(self):
        return False

    def liveness(self):
        return f"host directory {self.host_dir}"

    def made_anew(self):
        return f"host directory {self.host_dir} was (re)created"

    def heartbeat(self, timeout):
        self.timeouts.append(timeout)
        self.refreshes += 1
        present, self.dir_present = self.dir_present, True
        return None if present else f"host directory {self.host_dir} had expired or lost its TTL"

    def read(self):  # what a full reconcile finds: nothing (these tests follow events, not drift)
        return register.Records({})

    def apply(self, deletes, puts, report, keep=None):
        for key in deletes:
            self.delete(key)
            report(key, None)
        for key, value in puts:
            try:
                self.put(key, value)
            except register.RecordRefused as exc:
                report(key, exc)
                continue
            report(key, None)

    def put(self, key, value):
        self.records[key] = value

    def delete(self, key):
        self.records.pop(key, None)


class FakeEngine:
    def running(self):
        return []


def reconciler(cfg: Config, registry=None, engine=None, stop=None) -> Reconciler:
    if stop is None:
        stop = threading.Event()
        stop.set()  # nothing waits: each test drives the steps itself
    return Reconciler(cfg, registry or FakeRegistry(), engine or FakeEngine(), stop,
                      schedule=lambda: RetrySchedule(jitter=None))


def test_backoff_schedule_doubles_from_half_a_second_up_to_ten():
    schedule = RetrySchedule(jitter=None)
    assert [schedule.next_delay() for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert schedule.failures == 7
    schedule.reset()
    assert (schedule.next_delay(), schedule.failures) == (0.5, 1)


def test_backoff_jitter_stays_within_the_schedule():
    schedule = RetrySchedule()
    delays = [schedule.next_delay() for _ in range(12)]
    caps = [0.5, 1, 2, 4, 8, 10, 10, 10, 10, 10, 10, 10]
    assert all(0 <= delay <= cap for delay, cap in zip(delays, caps))
    assert len(set(delays)) > 1


def test_timer():
    with freeze_time("2026-11-22 00:00:00") as clock:
        timer = Timer(20, due_now=False)
        assert not timer.due() and timer.remaining() == 20
        clock.tick(19.9)
        assert not timer.due()
        clock.tick(0.1)
        assert timer.due() and timer.remaining() == 0
        timer.restart()
        assert timer.remaining() == 20


def test_the_ttl_is_refreshed_every_third_of_the_ttl():
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30), registry)
        worker.set_events_connected(True)
        worker.step()  # the host directory is adopted: the heartbeat is due at once
        refreshes = []
        for _ in range(31):
            worker.heartbeat.step()
            refreshes.append(registry.refreshes)
            clock.tick(1)
    # at once (what a restarted registrar adopted may have little time left), then at t = 10, 20
    # and 30 s, and never twice for one interval
    assert refreshes == [1] * 10 + [2] * 10 + [3] * 10 + [4]


def test_no_refresh_while_docker_is_unreachable_then_one_as_soon_as_it_is_back(caplog):
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30), registry)
        worker.set_events_connected(True)
        worker.step()
        clock.tick(10)
        worker.heartbeat.step()
        assert registry.refreshes == 1
        worker.set_events_connected(False)  # dockerd died: the records can no longer be vouched for
        for _ in range(60):
            clock.tick(1)
            worker.heartbeat.step()
        assert registry.refreshes == 1  # the host directory expires with its TTL
        worker.set_events_connected(True)
        worker.heartbeat.step()
        assert registry.refreshes == 2  # at once, not at the next interval
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Docker is unreachable: no longer refreshing the TTL of /registered/10.0.0.1; its records "
        "expire within 30 s unless Docker returns"]


SUSPENDED = ("Docker is unreachable: no longer refreshing the TTL of /registered/10.0.0.1; its records "
             "expire within 30 s unless Docker returns")


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_adopted_ttl_due_before_dockers_first_answer_is_no_warning(caplog):
    # a restart within the TTL adopts the liveness and refreshes it as soon as Docker vouches;
    # the reconciler gets there before the event thread's first connection: nothing is wrong yet
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30), registry)
        worker.heartbeat.renewed(adopted=True)  # what the first step does once Docker answered
        worker.heartbeat.step()
        clock.tick(1)
        worker.heartbeat.step()
        assert (registry.refreshes, warnings(caplog)) == (0, [])
        worker.set_events_connected(True)
        worker.heartbeat.step()
        assert (registry.refreshes, warnings(caplog)) == (1, [])


def test_docker_down_at_start_with_an_adopted_ttl_is_said_once(caplog):
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30), registry)
        worker.heartbeat.renewed(adopted=True)
        worker.heartbeat.step()  # the refresh is due and waits for Docker
        worker.set_events_connected(False)  # the event thread's first attempt failed
        assert warnings(caplog) == [SUSPENDED]
        for _ in range(3):
            clock.tick(11)
            worker.heartbeat.step()
            worker.set_events_connected(False)  # each retry fails again
        assert (registry.refreshes, warnings(caplog)) == (0, [SUSPENDED])


def test_docker_down_at_start_without_an_adopted_ttl_is_said_at_the_refresh(caplog):
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30), registry)
        worker.heartbeat.renewed(adopted=False)  # a new host directory: its whole TTL ahead
        worker.heartbeat.step()
        worker.set_events_connected(False)
        assert warnings(caplog) == []  # nothing to refresh yet
        clock.tick(10)
        worker.heartbeat.step()
        assert (registry.refreshes, warnings(caplog)) == (0, [SUSPENDED])


def test_no_refresh_without_ttl():
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=0), registry)
        worker.set_events_connected(True)
        for _ in range(5):
            worker.step()
            clock.tick(100)
    assert registry.refreshes == 0 and worker.heartbeat is None


def test_full_reconcile_on_connect_then_every_resync_interval(caplog):
    caplog.set_level(logging.DEBUG, logger="register")
    with freeze_time("2026-11-22 00:00:00") as clock:
        worker = reconciler(config(ttl=0, resync=60))
        worker.step()
        assert worker.status.snapshot().full_reconciles == 0  # not before Docker's event stream is connected
        worker.set_events_connected(True)
        worker.step()
        assert worker.status.snapshot().full_reconciles == 1
        clock.tick(59)
        worker.step()
        assert worker.status.snapshot().full_reconciles == 1
        clock.tick(1)
        worker.step()
        assert worker.status.snapshot().full_reconciles == 2
    reasons = [r.getMessage().split(":")[0] for r in caplog.records if "full reconcile" in r.getMessage()]
    assert reasons == ["full reconcile (connected to Docker's event stream)",
                       "full reconcile (periodic resync)"]


def test_a_refresh_that_finds_the_directory_gone_triggers_a_full_reconcile(caplog):
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = FakeRegistry()
        worker = reconciler(config(ttl=30, resync=600), registry)
        worker.set_events_connected(True)
        worker.step()
        registry.dir_present = False
        clock.tick(10)
        worker.heartbeat.step()  # on its own thread in the service
        worker.step()
    assert worker.status.snapshot().full_reconciles == 2
    reasons = [r.getMessage().split(":")[0] for r in caplog.records if "full reconcile" in r.getMessage()]
    assert reasons == ["full reconcile (connected to Docker's event stream)",
                       "full reconcile (host directory had expired)"]


def test_each_retry_is_logged_with_its_cause_and_delay(caplog):
    port = free_port()  # nothing listens there: a real "connection refused"
    cfg = config(port=port)
    worker = reconciler(cfg, EtcdRegistry(cfg))
    for _ in range(3):
        worker.step()
    cause = f"etcd at http://127.0.0.1:{port} failed: connection refused"
    assert [r.getMessage() for r in caplog.records if r.name == "register"] == [
        f"{cause}; 0 container(s) pending; retrying in 0.5 s",
        f"{cause}; 0 container(s) pending; retrying in 1.0 s",
        f"{cause}; 0 container(s) pending; retrying in 2.0 s",
    ]


@pytest.mark.parametrize(("exception", "text"), [
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (TimeoutError("timed out"), "timed out"),
    (RuntimeError("first line\nsecond line"), "first line"),
])
def test_describe_gives_the_root_cause(exception, text):
    try:
        try:
            raise exception
        except Exception as inner:
            raise register.RegistryUnavailable("outer") from inner
    except register.RegistryUnavailable as outer:
        assert register.describe(outer) == text


def memory(cfg: Config) -> MemoryRegistry:
    """The verified fake, for one host whose engine is known."""
    registry = MemoryRegistry(cfg, MemoryEtcd())
    registry.engine_id = "engine-1"
    return registry


def records(registry: MemoryRegistry) -> dict[str, str]:
    """What etcd holds below the host key, read as a test reads etcd."""
    return MemoryStore(registry.etcd).records(registry.host_dir)


class OneContainerEngine(FakeEngine):
    def __init__(self, inspect):
        self.data = inspect
        self.inspects = 0

    def inspect(self, container_id):
        self.inspects += 1
        return self.data if container_id == self.data["Id"] else None


def wildcard_inspect() -> dict:
    fixture = Path(__file__).parent / "fixtures" / "inspect" / "wildcard_tcp_udp.json"
    return json.loads(fixture.read_text())["inspect"]


def test_a_failed_put_leaves_the_container_dirty_until_it_succeeds():
    inspect = wildcard_inspect()
    registry = memory(config(ttl=0))
    registry.etcd.down = "timed out"
    worker = reconciler(config(ttl=0), registry, OneContainerEngine(inspect))
    worker.set_events_connected(True)  # its full reconcile finds nothing in Docker's list
    worker.mark_dirty(inspect["Id"])
    for _ in range(3):
        worker.step()
        assert worker.queue.dirty() == {inspect["Id"]: False} and worker.known == {}
        assert worker.status.snapshot().last_error == "etcd at memory failed: timed out"
        assert registry.etcd.kvs == {}
    registry.etcd.down = None
    worker.step()
    assert worker.queue.dirty() == {}
    key = f"/registered/10.0.0.1/regtest::busybox:1/{inspect['Id']}"
    assert list(records(registry)) == [key]
    assert worker.known[inspect["Id"]].key == key


def test_a_container_that_stopped_goes_without_an_inspect_unless_it_started_again():
    inspect = wildcard_inspect()
    registry, engine = memory(config(ttl=0)), OneContainerEngine(inspect)
    worker = reconciler(config(ttl=0), registry, engine)
    worker.set_events_connected(True)
    key = f"/registered/10.0.0.1/regtest::busybox:1/{inspect['Id']}"
    worker.mark_dirty(inspect["Id"])  # start
    worker.step()
    assert (list(records(registry)), engine.inspects) == ([key], 1)
    worker.mark_dirty(inspect["Id"], stopped=True)  # die: Docker would make an inspect wait
    worker.step()
    assert (records(registry), engine.inspects, worker.known) == ({}, 1, {})
    worker.mark_dirty(inspect["Id"], stopped=True)  # docker restart: die, then start, coalesced
    worker.mark_dirty(inspect["Id"])
    writes = registry.etcd.writes
    worker.step()
    assert (list(records(registry)), engine.inspects) == ([key], 2)
    assert registry.etcd.writes == writes + 1  # one write request for the two events


class ListingEngine(OneContainerEngine):
    """Its container list shows the container running, as Docker's does for a moment after `die`."""

    def running(self):
        return [{"Id": self.data["Id"], "Names": ["/web"], "Image": "regtest/busybox:1",
                 "ImageID": "sha256:" + "0" * 64, "State": "running", "HostConfig": {"NetworkMode": "bridge"},
                 "Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}]}]


def test_a_die_event_wins_over_a_container_list_that_still_shows_the_container_running():
    inspect = wildcard_inspect()
    registry, engine = memory(config(ttl=0)), ListingEngine(inspect)
    worker = reconciler(config(ttl=0), registry, engine)
    worker.set_events_connected(True)  # a full reconcile is due
    worker.mark_dirty(inspect["Id"], stopped=True)  # and the container died meanwhile
    worker.step()
    assert (records(registry), engine.inspects, worker.status.snapshot().full_reconciles) == ({}, 0, 1)
    worker.mark_dirty(inspect["Id"])  # started again: the list is trusted for it again
    worker.queue.add_full("periodic resync")
    worker.step()
    assert records(registry) == {f"/registered/10.0.0.1/regtest::busybox:1/{inspect['Id']}": (
        f'[{{"container":"{inspect["Id"]}","image":"regtest::busybox:1","ip":"10.0.0.1",'
        '"public_port":"8080","private_port":"80","port_type":"tcp"}]')}
    assert engine.inspects == 0


def test_a_container_that_stopped_lately_is_inspected_while_the_list_still_shows_it_running():
    dead = wildcard_inspect()
    dead["State"] = {**dead["State"], "Running": False, "Status": "exited"}
    registry, engine = memory(config(ttl=0)), ListingEngine(dead)
    worker = reconciler(config(ttl=0), registry, engine)
    worker.set_events_connected(True)
    worker.step()  # the list shows it running, as it did before the die: registered from the list
    key = f"/registered/10.0.0.1/regtest::busybox:1/{dead['Id']}"
    assert (list(records(registry)), engine.inspects, worker.status.snapshot().full_reconciles) == (
        [key], 0, 1)
    worker.mark_dirty(dead["Id"], stopped=True)  # die: handled at once, without an inspect
    worker.step()
    assert (records(registry), engine.inspects, worker.status.snapshot().full_reconciles) == ({}, 0, 1)
    worker.queue.add_full("periodic resync")  # the list lags behind the event: it shows it running
    worker.step()
    assert (records(registry), engine.inspects, worker.status.snapshot().full_reconciles) == ({}, 1, 2)
    engine.running = list  # once the list has caught up, it is trusted again
    worker.queue.add_full("periodic resync")
    worker.step()
    assert worker.queue.stopped_lately() == set()


class ManyContainerEngine(FakeEngine):
    def __init__(self, inspects):
        self.data = {i["Id"]: i for i in inspects}

    def inspect(self, container_id):
        return self.data.get(container_id)


def test_a_refused_record_is_retried_alone_with_its_own_backoff_and_said_once(caplog):
    good, bad = wildcard_inspect(), wildcard_inspect()
    bad["Id"], bad["Name"] = "b" * 64, "/bad"
    registry = memory(config(ttl=0))
    registry.etcd.refuse = {f"/registered/10.0.0.1/regtest::busybox:1/{bad['Id']}"}
    with freeze_time("2026-11-22 00:00:00") as clock:
        # no periodic resync within the test: its container list (empty here) would take both
        worker = reconciler(config(ttl=0, resync=3600), registry, ManyContainerEngine([good, bad]))
        worker.set_events_connected(True)
        worker.mark_dirty(bad["Id"])
        worker.mark_dirty(good["Id"])
        worker.step()  # no exception: the refusal holds back nothing and stops nothing
        assert list(records(registry)) == [f"/registered/10.0.0.1/regtest::busybox:1/{good['Id']}"]
        assert registry.etcd.refused == 1 and worker.queue.dirty() == {}
        assert 0 <= worker.queue.refusals()[bad["Id"]] <= 0.5
        worker.step()
        assert registry.etcd.refused == 1  # not before its time
        for _ in range(40):  # 20 s: retried on the schedule 0.5, 1, 2, 4, 8 s (at most, with jitter)
            clock.tick(0.5)
            worker.step()
        assert 5 <= registry.etcd.refused <= 40
        registry.etcd.refuse.clear()  # etcd accepts it now (say the operator raised a limit)
        clock.tick(300)
        worker.step()
        assert sorted(records(registry)) == sorted(f"/registered/10.0.0.1/regtest::busybox:1/{c['Id']}"
                                                  for c in (good, bad))
        assert worker.queue.refusals() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"could not register bad ({'b' * 12}) image regtest/busybox:1: etcd refused it: request is too "
        "large; retrying this container alone in "
        f"{warnings[0].split(' alone in ')[1].split(' s ')[0]} s (backoff up to 300 s), the others are not "
        "held back"]


def test_network_events_matter_only_to_containers_known_to_run():
    worker = reconciler(config(ttl=0))
    cid = "c" * 64
    worker.mark_dirty(cid, stopped=None)  # docker run connects the networks before the start
    assert worker.queue.dirty() == {}  # no inspect of a container that is only being created
    worker.mark_dirty(cid)  # start
    worker.queue.resume("connected")
    worker.queue.take()
    worker.mark_dirty(cid, stopped=None)  # a network connect or disconnect while it runs: look again
    assert worker.queue.dirty() == {cid: False}
    worker.mark_dirty(cid, stopped=True)  # die
    worker.mark_dirty(cid, stopped=None)  # then Docker's network disconnect: the die holds
    assert worker.queue.dirty() == {cid: True}
    worker.queue.take()
    worker.mark_dirty(cid, stopped=None)  # one more, after the die was handled: nothing to do
    assert worker.queue.dirty() == {}


# -- the heartbeat: its own schedule, attempts bounded by the interval, failover at once ---------

class SilentMembers(FakeRegistry):
    """The first `silent` attempts meet members that accept and never answer: each waits out its
    whole timeout on the frozen clock, then fails over to the next endpoint."""

    endpoints = tuple(Endpoint("http", f"10.0.0.{n}", 2379) for n in (1, 2, 3))

    def __init__(self, clock, silent: int, quick: bool = False):
        super().__init__()
        self.clock, self.silent, self.quick = clock, silent, quick
        self.at = 0

    @property
    def beat_endpoint(self):
        return self.endpoints[self.at % len(self.endpoints)]

    def heartbeat(self, timeout):
        self.timeouts.append(timeout)
        if self.silent:
            self.silent -= 1
            if not self.quick:
                self.clock.tick(timeout)
            failed = self.beat_endpoint.url
            self.at += 1
            raise register.HeartbeatFailed(f"etcd at {failed} failed: timed out", failed,
                                           self.beat_endpoint.url, "timed out")
        self.refreshes += 1
        return None


def beating(registry, ttl: int) -> Reconciler:
    worker = reconciler(config(ttl=ttl), registry)
    worker.set_events_connected(True)
    worker.heartbeat.renewed(adopted=True)  # due at once
    return worker


def test_each_heartbeat_attempt_waits_an_even_share_of_the_interval_then_the_next_endpoint_at_once(caplog):
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = SilentMembers(clock, silent=2)
        worker = beating(registry, ttl=6)  # a heartbeat every 2 s, three endpoints: 1 s each
        delays = [worker.heartbeat.step() for _ in range(3)]
    assert registry.timeouts == [1.0, 1.0, 1.0] and registry.refreshes == 1
    assert delays == [0.0, 0.0, 2.0]  # the next endpoint at once; then the next interval
    assert [(r.fields["endpoint"], r.fields["next"]) for r in caplog.records
            if r.fields.get("event") == "heartbeat_retry"] == [
        ("http://10.0.0.1:2379", "http://10.0.0.2:2379"), ("http://10.0.0.2:2379", "http://10.0.0.3:2379")]
    assert warnings(caplog)[0] == (
        "heartbeat of host directory /registered/10.0.0.1 failed at http://10.0.0.1:2379: timed out; "
        "retrying in 0.0 s at http://10.0.0.2:2379")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][-1] == (
        "heartbeat of host directory /registered/10.0.0.1 answered by http://10.0.0.3:2379 after 2 "
        "failed attempt(s)")


def test_a_heartbeat_attempt_never_waits_past_its_interval_nor_the_request_timeout():
    with freeze_time("2026-11-22 00:00:00") as clock:
        short = SilentMembers(clock, silent=2)
        short.endpoints = short.endpoints[:1]
        worker = beating(short, ttl=6)  # one endpoint: the whole interval, 2 s, for each attempt
        for _ in range(3):
            worker.heartbeat.step()
        long = SilentMembers(clock, silent=1)
        worker = beating(long, ttl=60)  # a 20 s interval: no attempt waits past the 5 s timeout
        for _ in range(2):
            worker.heartbeat.step()
    assert short.timeouts == [2.0, 2.0, 2.0] and long.timeouts == [5.0, 5.0]


def test_a_quick_refusal_is_retried_after_a_short_backoff_not_in_a_loop():
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry = SilentMembers(clock, silent=3, quick=True)
        worker = beating(registry, ttl=30)
        worker.heartbeat._retries = RetrySchedule(first=0.25, cap=2.5, jitter=None)
        delays = [worker.heartbeat.step() for _ in range(4)]
    assert delays == [0.25, 0.5, 1.0, 10.0]


class CountingStop(threading.Event):
    """The reconciler's stop event, whose waits return at once and are counted; set after
    `limit` of them, which ends run()."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.waits = limit, []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if len(self.waits) >= self.limit:
            self.set()
        return self.is_set()


def test_an_unexpected_error_that_recurs_backs_off_even_when_steps_succeed_in_between(caplog):
    """A bug after a step's work was done (the wait itself failing) must still back off: the
    "recovered" of the step before it once reset the backoff, and the bug looped every 0.5 s."""
    worker = reconciler(config(ttl=0), stop=CountingStop(6))
    worker.set_events_connected(True)

    def broken_wait():
        raise OverflowError("timestamp out of range for platform time_t")

    worker.queue.wait = broken_wait
    worker.run()
    assert worker.stop.waits == [0.5, 1, 2, 4, 8, 10]
    assert sum("unexpected error in the reconciler" in r.getMessage() for r in caplog.records) == 6


def test_a_host_key_found_lost_again_and_again_backs_off_after_the_first_time(caplog):
    """Two registrars of one engine rewrite the host key in turn, and each finds its guard broken:
    the first loss is acted on at once, the ones after it wait, instead of a loop without end."""
    class Guarded(FakeRegistry):
        def read(self):
            raise register.HostLost("host key /registered/10.0.0.1 no longer holds this registrar's record")

    worker = reconciler(config(ttl=0), Guarded(), stop=CountingStop(4))
    worker.set_events_connected(True)
    worker.run()
    assert worker.stop.waits == [0.5, 1, 2, 4]  # 5 losses: the first without a wait
    assert warnings(caplog)[0] == (
        "host key /registered/10.0.0.1 no longer holds this registrar's record; 0 container(s) "
        "pending; retrying in 0.5 s")


# -- the reconciler on the verified fake: liveness loss, coalescing ------------------------------

def test_a_lease_lost_is_granted_anew_and_every_record_written_again_on_it(caplog):
    inspect = wildcard_inspect()
    key = f"/registered/10.0.0.1/regtest::busybox:1/{inspect['Id']}"
    with freeze_time("2026-11-22 00:00:00") as clock:
        registry, engine = memory(config(ttl=30, resync=600)), ListingEngine(inspect)
        worker = reconciler(config(ttl=30, resync=600), registry, engine)
        worker.set_events_connected(True)
        worker.step()  # a lease granted, then the full reconcile registers what the list shows
        first = registry.lease
        store = MemoryStore(registry.etcd)
        assert list(records(registry)) == [key] and store.lease_of(key) == first
        registry.etcd.revoke(first)  # etcd lost it (expired while this host was cut off, say)
        assert records(registry) == {} and not store.host_present(registry.host_dir)
        clock.tick(10)
        worker.heartbeat.step()  # its keepalive finds it gone (on its own thread in the service)
        worker.step()
        assert registry.lease not in (None, first)
        assert list(records(registry)) == [key] and store.lease_of(key) == registry.lease
        assert store.lease_of(registry.host_dir) == registry.lease
        assert worker.status.snapshot().full_reconciles == 2
    lost = [r for r in caplog.records if r.fields.get("event") == "host_dir_lost"]
    assert [r.fields["lease"] for r in lost] == [f"{registry.lease:x}"]


def test_events_for_one_container_coalesce_into_one_write_and_each_container_is_one_key():
    good, other = wildcard_inspect(), wildcard_inspect()
    other["Id"], other["Name"] = "c" * 64, "/other"
    registry = memory(config(ttl=0, resync=3600))
    worker = reconciler(config(ttl=0, resync=3600), registry, ManyContainerEngine([good, other]))
    worker.set_events_connected(True)
    worker.step()  # the first full reconcile: nothing in Docker's list
    writes = registry.etcd.writes
    for _ in range(5):  # start, network connect, ... as Docker sends them for one container
        worker.mark_dirty(good["Id"])
    worker.mark_dirty(other["Id"])
    worker.step()
    assert registry.etcd.writes == writes + 1  # one apply for the whole batch
    assert sorted(records(registry)) == sorted(f"/registered/10.0.0.1/regtest::busybox:1/{c['Id']}"
                                               for c in (good, other))
    assert worker.queue.dirty() == {}
    worker.step()  # nothing left to do: nothing written
    assert registry.etcd.writes == writes + 1
