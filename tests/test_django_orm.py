"""The Django ORM queue (DJANGO_ORM, funboost_like.contrib.django) in a real Django project (tests/django_project).

The broker's contract is tested by tests/test_broker_contract.py (-k DJANGO_ORM); here: the app's
migrations, the seeds' calls (mq_producer, mq_consumer, mq_consumer_thread, mq_consumer_process) with
topics and priority, several consumer processes on one table, task_deco on DJANGO_ORM, Django's
async-unsafe guard, forked children and the admin. Each test deletes the rows of the topics it made.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402

from funboost_like import BrokerEnum, patch_frame_config, task_deco  # noqa: E402
from funboost_like.brokers.registry import get_broker  # noqa: E402
from funboost_like.contrib.django import conf, mq_consumer, mq_consumer_process, mq_consumer_thread, mq_producer  # noqa: E402

from .conftest import in_forked_child, require_server, until  # noqa: E402

SERVERS = {"default": None, "postgresql": ("PostgreSQL", "127.0.0.1", 5432), "mariadb": ("MariaDB", "127.0.0.1", 3306)}
_migrated: set[str] = set()


@pytest.fixture(params=list(SERVERS), ids=["sqlite", "postgresql", "mariadb"])
def alias(request: pytest.FixtureRequest) -> str:
    """A database of the test project, set up and migrated (once per session) for the broker."""
    name: str = request.param
    server = SERVERS[name]
    if server is not None:
        require_server(*server)
    use(name)
    return name


def use(name: str) -> None:
    patch_frame_config(DJANGO_SETTINGS_MODULE="tests.django_project.settings", DJANGO_DATABASE_ALIAS=name,
                       DJANGO_LEASE_SECONDS=2.0)
    conf.ensure_django()
    if name not in _migrated:
        call_command("migrate", *(() if name == "default" else ("funboost_like_django",)), database=name,
                     verbosity=0, interactive=False)
        _migrated.add(name)


@pytest.fixture
def topics(alias: str) -> Iterator[Callable[[str], str]]:
    """Topic names unique to this test; their rows are deleted afterwards."""
    made: list[str] = []

    def topic(suffix: str) -> str:
        made.append(f"test_{uuid.uuid4().hex[:10]}_{suffix}")
        return made[-1]

    yield topic
    from funboost_like.contrib.django import models

    for model in (models.QueuedMessage, models.DeadLetter, models.Record):
        model.objects.using(alias).filter(queue__in=made).delete()


class Collector:
    """What consuming functions received, with an event per expected count."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def __call__(self, message: dict[str, Any]) -> None:
        with self.changed:
            self.got.append(message)
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= n, timeout), f"got {len(self.got)} of {n}"
            return list(self.got)


def stop(boosters: list[Any]) -> None:
    for booster in boosters:
        booster.stop()
    for booster in boosters:
        assert booster.consumer.join(15)


def test_migrate_made_the_tables(alias: str) -> None:
    tables = connections[alias].introspection.table_names()
    assert {"funboost_like_message", "funboost_like_dead_letter", "funboost_like_record",
            "funboost_like_binding"} <= set(tables)
    call_command("migrate", "funboost_like_django", database=alias, verbosity=0)  # again: nothing to do


def test_seed_producer_and_consumer_with_priority(alias: str, topics: Callable[[str], str]) -> None:
    from funboost_like.contrib.django.models import QueuedMessage

    topic = topics("yace")
    mq_producer(topic=topic, message={"n": 1})
    mq_producer(QueuedMessage, topic=topic, message={"n": 2, "text": "二"})  # the seeds' leading model
    mq_producer(topic, {"n": 3}, priority=5)
    assert QueuedMessage.objects.using(alias).filter(queue=topic).count() == 3
    collector = Collector()
    boosters = mq_consumer(collector, topic=topic, block=False)  # one at a time, as the seeds' consumer
    try:
        got = collector.wait_for(3)
    finally:
        stop(boosters)
    assert got == [{"n": 3}, {"n": 1}, {"n": 2, "text": "二"}]  # higher priority first, then FIFO
    assert QueuedMessage.objects.using(alias).filter(queue=topic).count() == 0  # acked rows are deleted


def test_seed_consumer_thread_with_two_topics(alias: str, topics: Callable[[str], str]) -> None:
    debug, run = topics("debug"), topics("run")
    debugs, runs = Collector(), Collector()
    for i in range(10):
        mq_producer(topic=debug, message={"i": i})
        mq_producer(topic=run, message={"i": i, "case": "load"})
    boosters = mq_consumer_thread(fun_topics=[{"fun": debugs, "topic": debug}, {"fun": runs, "topic": run}],
                                  worker=2, block=False)
    try:
        assert sorted(m["i"] for m in debugs.wait_for(10)) == list(range(10))
        assert sorted(m["i"] for m in runs.wait_for(10)) == list(range(10))
    finally:
        stop(boosters)
    assert all(m["case"] == "load" for m in runs.got) and all("case" not in m for m in debugs.got)


def test_task_deco_on_django_orm_reads_the_seeds_messages(alias: str, topics: Callable[[str], str]) -> None:
    topic = topics("deco")
    done: list[tuple[int, str]] = []
    finished = threading.Event()

    @task_deco(topic, broker_kind=BrokerEnum.DJANGO_ORM, concurrent_num=2)
    def add(a: int, b: str = "") -> None:
        done.append((a, b))
        if len(done) == 3:
            finished.set()

    add.push(1, b="x")
    add.publish({"a": 2})
    mq_producer(topic=topic, message={"a": 3, "b": "seed"})  # same wire format: keyword arguments
    assert add.get_message_count() == 3
    add.consume()
    try:
        assert finished.wait(20)
    finally:
        add.stop()
        add.consumer.join(15)
    assert sorted(done) == [(1, "x"), (2, ""), (3, "seed")]


def test_calls_from_a_running_event_loop_pass_the_async_unsafe_guard(alias: str,
                                                                     topics: Callable[[str], str]) -> None:
    topic = topics("async")
    broker = get_broker(BrokerEnum.DJANGO_ORM)

    async def main() -> tuple[int, list[bytes]]:
        mq_producer(topic=topic, message={"from": "coroutine"})  # a sync call in the loop's thread
        broker.publish(topic, b'{"n":2}', priority=1)
        size = broker.count(topic)
        got = broker.fetch(topic, 5, 2.0)
        broker.ack(got)
        store = broker.key_value_store(topic, "guard")
        store.put("k", b"v", 10)
        assert store.get("k") == b"v"
        return size, [d.body for d in got]

    size, bodies = asyncio.run(main())
    assert size == 2
    assert bodies[0] == b'{"n":2}' and json.loads(bodies[1])["from"] == "coroutine"


def test_forked_child_opens_its_own_connection(alias: str, topics: Callable[[str], str]) -> None:
    topic = topics("fork")
    broker = get_broker(BrokerEnum.DJANGO_ORM)
    broker.publish(topic, b'{"n":1}')
    assert broker.count(topic) == 1  # the parent holds a connection now

    def in_child() -> str:
        broker.publish(topic, b'{"n":2}')
        return str(broker.count(topic))

    assert in_forked_child(in_child) == "2"
    got = broker.fetch(topic, 5, 2.0)  # the parent's connection still works after the child's exit
    broker.ack(got)
    assert sorted(d.body for d in got) == [b'{"n":1}', b'{"n":2}']


def test_several_consumer_processes_on_one_table(alias: str, topics: Callable[[str], str], tmp_path: Path) -> None:
    """No message runs twice, none is lost, with three processes taking from one topic (and a second topic)."""
    first, second = topics("p1"), topics("p2")
    record = tmp_path / "record"
    total = 60
    for topic in (first, second):
        get_broker(BrokerEnum.DJANGO_ORM)  # the broker of this process: its connections stay the parent's
        for i in range(total):
            mq_producer(topic=topic, message={"i": i if topic == first else total + i, "record": str(record),
                                              "seconds": 0.01})
    from tests.django_project.tasks import record_message

    supervisor = mq_consumer_process(fun_topics=[{"fun": record_message, "topic": first},
                                                 {"fun": record_message, "topic": second}],
                                     worker=3, threads=2, block=False, start_method="fork")
    assert supervisor is not None
    try:
        deadline = time.monotonic() + 60
        while len(lines(record)) < 2 * total and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        supervisor.stop()
        supervisor.join(30)
    runs = collections.Counter(int(line.split()[0]) for line in lines(record))
    assert set(runs) == set(range(2 * total)) and max(runs.values()) == 1
    assert len({line.split()[1] for line in lines(record)}) > 1  # the work was shared


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- the admin (SQLite, the project's default database, fully migrated) ------------------------------


@pytest.fixture
def admin_client(topics: Callable[[str], str], alias: str) -> Any:
    if alias != "default":
        pytest.skip("the admin pages are tested on the default database")
    from django.contrib.auth.models import User
    from django.test import Client

    user, _ = User.objects.get_or_create(username="funboost_like_admin", defaults={"is_staff": True,
                                                                                  "is_superuser": True})
    client = Client()
    client.force_login(user)
    return client


def test_admin_pages_and_actions(admin_client: Any, topics: Callable[[str], str]) -> None:
    from funboost_like.contrib.django.models import DeadLetter, QueuedMessage

    topic = topics("admin")
    broker = get_broker(BrokerEnum.DJANGO_ORM)
    broker.publish(topic, b'{"n":1,"extra":{"task_id":"t1","publish_time":1000.0,"run_at":1000.0}}')
    broker.publish(topic, b'{"n":2}', not_before=time.time() + 600)
    broker.publish(topic, b'{"n":3}')
    [bad] = broker.fetch(topic, 1, 2.0)
    broker.dead_letter(bad, "body is not valid <JSON>")
    assert admin_client.get("/admin/").status_code == 200

    page = admin_client.get("/admin/funboost_like_django/queue/")
    assert page.status_code == 200
    assert topic in page.content.decode()
    listing = admin_client.get(f"/admin/funboost_like_django/queuedmessage/?queue__exact={topic}&state=delayed")
    assert listing.status_code == 200 and '{"n":2}' in listing.content.decode().replace("&quot;", '"')
    letters = admin_client.get(f"/admin/funboost_like_django/deadletter/?queue__exact={topic}")
    assert letters.status_code == 200 and "body is not valid &lt;JSON&gt;" in letters.content.decode()
    letter = DeadLetter.objects.get(queue=topic)
    assert admin_client.get(f"/admin/funboost_like_django/deadletter/{letter.pk}/change/").status_code == 200

    # requeue the dead letter: back in its queue, ready now
    answer = admin_client.post("/admin/funboost_like_django/deadletter/",
                               {"action": "requeue", "_selected_action": [letter.pk]})
    assert answer.status_code == 302
    assert not DeadLetter.objects.filter(queue=topic).exists()
    assert broker.count(topic) == 3
    # published anew, as requeue-dead does: with its old publish time, expiry or misfire grace dropped it
    [extra] = [message["extra"] for message in (json.loads(bytes(row.body)) for row in
                                                 QueuedMessage.objects.filter(queue=topic)) if "extra" in message]
    assert extra["first_publish_time"] == 1000.0 and time.time() - extra["publish_time"] < 60
    assert "run_at" not in extra

    # requeue the delayed message: ready now
    delayed = QueuedMessage.objects.get(queue=topic, body=b'{"n":2}')
    admin_client.post("/admin/funboost_like_django/queuedmessage/", {"action": "requeue",
                                                                    "_selected_action": [delayed.pk]})
    got = broker.fetch(topic, 5, 2.0)
    assert sorted(json.loads(d.body)["n"] for d in got) == [1, 2, 3]
    broker.release(got)

    # delete them all (the admin's own action, confirmed)
    pks = list(QueuedMessage.objects.filter(queue=topic).values_list("pk", flat=True))
    answer = admin_client.post("/admin/funboost_like_django/queuedmessage/",
                               {"action": "delete_selected", "_selected_action": pks, "post": "yes"})
    assert answer.status_code == 302
    assert broker.count(topic) == 0


@pytest.fixture
def silent_alias(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """The alias "silent_link": the test project's MariaDB behind a CuttableLink (the tables made by "mariadb")."""
    from .tcp_cut import CuttableLink

    require_server("MariaDB", "127.0.0.1", 3306)
    use("mariadb")
    link = CuttableLink(3306)
    connections.settings["silent_link"] = {**connections.settings["mariadb"], "PORT": str(link.port),
                                           "OPTIONS": {"charset": "utf8mb4"}}
    try:
        yield "silent_link", link
    finally:
        link.close()
        connections["silent_link"].close()
        del connections.settings["silent_link"]


@pytest.mark.timeout(90)
def test_a_consumer_whose_link_goes_silent_mid_fetch_reconnects_once_it_is_back(
        silent_alias: tuple[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The path to the database went silent during a fetch (a proxy that stops forwarding: no reset): the
    driver waited in recv forever, and the consumer never fetched again, even once the path was back. The
    broker now gives the alias's OPTIONS read and write timeouts it does not set (60 s; 1 s here)."""
    import logging

    from funboost_like.brokers import django_orm

    from .tcp_cut import ride_out_a_silence

    alias, link = silent_alias
    monkeypatch.setattr(django_orm, "READ_TIMEOUT", 1, raising=False)
    monkeypatch.setattr(django_orm, "CONNECT_TIMEOUT", 1, raising=False)
    caplog.set_level(logging.INFO, logger="funboost_like")
    topic = f"test_{uuid.uuid4().hex[:10]}_silent"
    patch_frame_config(DJANGO_DATABASE_ALIAS=alias)
    get_broker(BrokerEnum.DJANGO_ORM).count(topic)  # the consumers' broker: on the link
    patch_frame_config(DJANGO_DATABASE_ALIAS="mariadb")
    direct = django_orm.DjangoOrmBroker()
    done = {1: threading.Event(), 2: threading.Event()}

    @task_deco(topic, broker_kind=BrokerEnum.DJANGO_ORM, concurrent_num=1)
    def f(x: int) -> None:
        done[x].set()

    from funboost_like.contrib.django import models

    def stored() -> int:
        return int(models.QueuedMessage.objects.using("mariadb").filter(queue=topic).count())

    try:
        f.consume()
        direct.publish(topic, b'{"x": 1}')
        assert done[1].wait(10)
        assert until(lambda: stored() == 0, timeout=10)  # its ack went through
        ride_out_a_silence(link, lambda: direct.publish(topic, b'{"x": 2}'), done[2], stored, caplog)
    finally:
        f.stop()
        f.consumer.join(15)
        models.QueuedMessage.objects.using("mariadb").filter(queue=topic).delete()
        direct.close()


def test_the_alias_gets_bounds_on_a_silent_server_its_options_do_not_set() -> None:
    """Keepalives on PostgreSQL (libpq), read and write timeouts on MariaDB; what OPTIONS sets wins."""
    from funboost_like.brokers.django_orm import _bound_waits

    require_server("PostgreSQL", "127.0.0.1", 5432)
    use("postgresql")
    settings_dict = connections.settings["postgresql"]
    before = settings_dict.get("OPTIONS")
    settings_dict["OPTIONS"] = {"keepalives_idle": 20}
    try:
        connection = connections["postgresql"]
        connection.close()
        _bound_waits(connection)
        with connection.cursor():
            info = {option.keyword.decode(): option.val for option in connection.connection.pgconn.info}
        assert (info["keepalives"], info["keepalives_idle"], info["keepalives_count"]) == (b"1", b"20", b"3")
        assert info["connect_timeout"] == b"10"
    finally:
        connections["postgresql"].close()
        settings_dict["OPTIONS"] = before if before is not None else {}
    mariadb = {"OPTIONS": {"read_timeout": 120}}
    _bound_waits(type("C", (), {"vendor": "mysql", "settings_dict": mariadb})())
    assert mariadb["OPTIONS"] == {"connect_timeout": 10, "read_timeout": 120, "write_timeout": 60}
