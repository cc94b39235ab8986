"""The tables of the DJANGO_ORM broker (created by ``manage.py migrate``; see docs/django.md).

:class:`QueuedMessage` is the :class:`~funboost_like.brokers.leased_table.LeasedTable` row shape with a
``queue`` column (the seeds' topic): one table serves every queue. Times are UNIX times (floats), as
the broker compares them with ``time.time()``; the admin shows them as dates. On MySQL and MariaDB
the migration gives the name columns a binary collation, so queue names and keys differing in case
or accents stay distinct as on the other databases.
"""

from __future__ import annotations

import time

from django.db import models


class QueuedMessage(models.Model):
    """A message: waiting (no owner), or held by ``owner`` until ``visible_at`` (its lease)."""

    id = models.BigAutoField(primary_key=True)  # the delivery token; orders equal priorities
    queue = models.CharField("queue (topic)", max_length=191)
    priority = models.IntegerField(default=0)  # higher first
    visible_at = models.FloatField()  # waiting: ready from then on; held: the end of the lease
    owner = models.CharField(max_length=64, null=True, blank=True)  # host:pid:random of the consumer process
    attempts = models.IntegerField(default=0)
    crashes = models.IntegerField(default=0)  # deliveries that ended with their consumer's death
    body = models.BinaryField()  # the JSON message
    created = models.FloatField(default=time.time, editable=False)

    class Meta:
        db_table = "funboost_like_message"
        verbose_name = "queued message"
        indexes = [models.Index(fields=["queue", "-priority", "id", "visible_at"], name="funboost_like_take")]

    def __str__(self) -> str:
        return f"{self.queue} #{self.id}"


class Queue(QueuedMessage):
    """The admin's overview of the queues (no table of its own)."""

    class Meta:
        proxy = True
        verbose_name = "queue"

class DeadLetter(models.Model):
    """A message the framework gave up on, with the reason."""

    id = models.BigAutoField(primary_key=True)
    queue = models.CharField("queue (topic)", max_length=191)
    message_id = models.BigIntegerField(null=True)
    body = models.BinaryField()
    reason = models.TextField()
    failed_at = models.FloatField()
    attempts = models.IntegerField(default=0)

    class Meta:
        db_table = "funboost_like_dead_letter"
        indexes = [models.Index(fields=["queue", "-id"], name="funboost_like_dead_queue")]

    def __str__(self) -> str:
        return f"{self.queue} dead letter #{self.id}"


class Record(models.Model):
    """A key-value record beside a queue (RPC results, task filters), invisible once expired."""

    id = models.BigAutoField(primary_key=True)
    queue = models.CharField(max_length=191)
    namespace = models.CharField(max_length=64)
    key = models.CharField(max_length=255)
    value = models.BinaryField()
    expires_at = models.FloatField(null=True, db_index=True)

    class Meta:
        db_table = "funboost_like_record"
        constraints = [models.UniqueConstraint(fields=["queue", "namespace", "key"], name="funboost_like_record_key")]

    def __str__(self) -> str:
        return f"{self.queue}/{self.namespace}/{self.key}"


class Binding(models.Model):
    """Emulated routing: ``queue`` gets what is published to ``exchange`` with a key matching ``key``."""

    id = models.BigAutoField(primary_key=True)
    exchange = models.CharField(max_length=191)
    exchange_type = models.CharField(max_length=16)
    queue = models.CharField(max_length=191)
    key = models.CharField(max_length=191)

    class Meta:
        db_table = "funboost_like_binding"
        constraints = [models.UniqueConstraint(fields=["exchange", "queue", "key"], name="funboost_like_binding_key")]

    def __str__(self) -> str:
        return f"{self.exchange} -> {self.queue} ({self.key})"


