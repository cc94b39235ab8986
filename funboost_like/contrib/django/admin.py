"""The admin of the queues: an overview of every queue, messages by topic and state, dead letters with
their reasons, and the requeue and delete actions.

Every page reads the database the broker uses (:func:`funboost_like.contrib.django.conf.database_alias`).
Rows are not edited by hand (no add or change form); requeueing needs the change permission of the
model, deleting its delete permission.
"""

from __future__ import annotations

import datetime
import time
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, Q
from django.template import engines
from django.template.response import TemplateResponse
from django.urls import reverse

from funboost_like.contrib.django import conf
from funboost_like.contrib.django.models import DeadLetter, Queue, QueuedMessage
from funboost_like.core.message import republished

STATES = {  # state -> (label, condition at time `now`)
    "waiting": ("waiting (ready)", lambda now: Q(owner__isnull=True, visible_at__lte=now)),
    "delayed": ("delayed", lambda now: Q(owner__isnull=True, visible_at__gt=now)),
    "held": ("held by a consumer", lambda now: Q(owner__isnull=False, visible_at__gt=now)),
    "abandoned": ("abandoned (lease ran out)", lambda now: Q(owner__isnull=False, visible_at__lte=now)),
}

OVERVIEW = """{% extends "admin/base_site.html" %}
{% block content %}<div id="content-main"><table id="funboost-like-queues">
<thead><tr><th>Queue (topic)</th>{% for label in labels %}<th>{{ label }}</th>{% endfor %}
<th>Dead letters</th></tr></thead><tbody>
{% for row in rows %}<tr><td><a href="{{ row.url }}">{{ row.queue }}</a></td>
{% for count, url in row.cells %}<td><a href="{{ url }}">{{ count }}</a></td>{% endfor %}</tr>
{% empty %}<tr><td colspan="6">No queue has messages or dead letters.</td></tr>{% endfor %}
</tbody></table></div>{% endblock %}"""


def _when(timestamp: float | None) -> datetime.datetime | None:
    return None if timestamp is None else datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)


def _preview(body: Any, length: int = 200) -> str:
    text = bytes(body).decode("utf-8", "replace")
    return text if len(text) <= length else text[:length] + "…"


class _QueueTableAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Read-only rows of the broker's database."""

    def get_queryset(self, request: Any) -> Any:
        return super().get_queryset(request).using(conf.database_alias())

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_requeue_permission(self, request: Any) -> bool:
        opts = self.opts
        return bool(request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}"))


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return [(state, label) for state, (label, _) in STATES.items()]

    def queryset(self, request: Any, queryset: Any) -> Any:
        state = STATES.get(self.value() or "")
        return queryset if state is None else queryset.filter(state[1](time.time()))


@admin.register(QueuedMessage)
class QueuedMessageAdmin(_QueueTableAdmin):
    list_display = ("id", "queue", "state", "priority", "attempts", "crashes", "visible", "owner", "message")
    list_filter = ("queue", StateFilter)
    search_fields = ("queue",)
    ordering = ("queue", "-priority", "id")
    actions = ["requeue"]
    readonly_fields = ("queue", "priority", "visible", "owner", "attempts", "crashes", "message", "created_at")
    fields = readonly_fields

    @admin.display(description="state")
    def state(self, obj: QueuedMessage) -> str:
        now = time.time()
        if obj.owner is None:
            return "waiting" if obj.visible_at <= now else "delayed"
        return "held" if obj.visible_at > now else "abandoned"

    @admin.display(description="visible at / lease until", ordering="visible_at")
    def visible(self, obj: QueuedMessage) -> datetime.datetime | None:
        return _when(obj.visible_at)

    @admin.display(description="created", ordering="created")
    def created_at(self, obj: QueuedMessage) -> datetime.datetime | None:
        return _when(obj.created)

    @admin.display(description="message")
    def message(self, obj: QueuedMessage) -> str:
        return _preview(obj.body)

    @admin.action(description="Requeue: ready now, no owner", permissions=["requeue"])
    def requeue(self, request: Any, queryset: Any) -> None:
        count = queryset.update(owner=None, visible_at=time.time())
        self.message_user(request, f"{count} message(s) requeued.", messages.SUCCESS)


@admin.register(DeadLetter)
class DeadLetterAdmin(_QueueTableAdmin):
    list_display = ("id", "queue", "reason", "attempts", "failed", "message")
    list_filter = ("queue",)
    search_fields = ("queue", "reason")
    ordering = ("-id",)
    actions = ["requeue"]
    readonly_fields = ("queue", "message_id", "reason", "attempts", "failed", "message")
    fields = readonly_fields

    @admin.display(description="failed at", ordering="failed_at")
    def failed(self, obj: DeadLetter) -> datetime.datetime | None:
        return _when(obj.failed_at)

    @admin.display(description="message")
    def message(self, obj: DeadLetter) -> str:
        return _preview(obj.body)

    @admin.action(description="Requeue: back to their queue, ready now", permissions=["requeue"])
    def requeue(self, request: Any, queryset: Any) -> None:
        alias = queryset.db
        with transaction.atomic(using=alias):
            letters = list(queryset.select_for_update())
            now = time.time()
            QueuedMessage.objects.using(alias).bulk_create(
                [QueuedMessage(queue=letter.queue, visible_at=now, body=republished(bytes(letter.body), now))
                 for letter in letters])
            queryset.filter(pk__in=[letter.pk for letter in letters]).delete()
        self.message_user(request, f"{len(letters)} dead letter(s) requeued.", messages.SUCCESS)


@admin.register(Queue)
class QueueAdmin(_QueueTableAdmin):
    """The overview: one line per queue with its messages by state and its dead letters."""

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: Any, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        alias, now = conf.database_alias(), time.time()
        counts = {row["queue"]: row for row in QueuedMessage.objects.using(alias).values("queue").order_by().annotate(
            **{state: Count("id", filter=condition(now)) for state, (_, condition) in STATES.items()})}
        dead = dict(DeadLetter.objects.using(alias).values("queue").order_by().annotate(n=Count("id"))
                    .values_list("queue", "n"))
        messages_url = reverse(f"{self.admin_site.name}:funboost_like_django_queuedmessage_changelist")
        dead_url = reverse(f"{self.admin_site.name}:funboost_like_django_deadletter_changelist")
        rows = []
        for queue in sorted(set(counts) | set(dead)):
            query = urlencode({"queue__exact": queue})
            cells = [(counts.get(queue, {}).get(state, 0), f"{messages_url}?{query}&state={state}") for state in STATES]
            rows.append({"queue": queue, "url": f"{messages_url}?{query}",
                         "cells": [*cells, (dead.get(queue, 0), f"{dead_url}?{query}")]})
        context = {**self.admin_site.each_context(request), "title": "Queues", "rows": rows,
                   "labels": [label for label, _ in STATES.values()], "opts": self.opts, **(extra_context or {})}
        return TemplateResponse(request, engines["django"].from_string(OVERVIEW), context)
