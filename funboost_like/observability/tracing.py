"""OpenTelemetry spans: a ``publish`` span per published call and a ``process`` span per consumed call, one trace.

The publisher starts a span ``publish <queue>`` (kind PRODUCER) around the broker's publish and
writes its trace context into the message's ``extra`` under :data:`TRACE_KEY` (a small dict of
strings, ``traceparent`` and ``tracestate`` with the default W3C propagator), which every broker
carries unchanged. The consumer starts ``process <queue>`` (kind CONSUMER) as that span's child just
before the call, makes it the current span while the function runs (so the function's own spans,
and calls it publishes, join the trace), and ends it with the outcome. Attributes: the queue, the
message id (``messaging.message.id``, the task id), the attempts and the outcome; never an argument.

**When.** Only with the ``OPENTELEMETRY_TRACING`` setting on (the default), ``opentelemetry-api``
installed, and a real tracer provider set (an SDK's: ``trace.set_tracer_provider(TracerProvider())``);
the API's default provider makes no spans, so nothing happens without an SDK. This module never
imports ``opentelemetry``: it uses it once the application has (setting a provider needs it). The
cost without an SDK: a consumer gets no tracing middleware at all (decided when it is created, so
configure the SDK before ``fn.consume()``); a publisher looks for a provider at most once a second
(a method call and a clock read per publish in between).
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import DEAD_LETTERED, FAILED, OUTCOME_NAMES, Call, Middleware
from funboost_like.core.config import settings

if TYPE_CHECKING:
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.publisher import Publisher

TRACE_KEY = "trace_context"
RECHECK_SECONDS = 1.0
_monotonic = time.monotonic
SYSTEM = "funboost_like"


@cache
def _installed() -> bool:
    """Whether ``opentelemetry-api`` is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("opentelemetry") is not None


def _api() -> ModuleType | None:
    """``opentelemetry.trace`` if the application imported it. Never imported here: an application
    that configured an SDK has imported it (to set its provider), so one that did not pays nothing."""
    return sys.modules.get("opentelemetry.trace")


def sdk_tracer() -> Any | None:
    """funboost_like's tracer when tracing is on and an SDK's provider is set; else None."""
    if not settings.get("OPENTELEMETRY_TRACING"):
        return None
    trace = _api()
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer(SYSTEM)


class PublishSpan:
    """One open ``publish`` span; :attr:`extra` is the message's extra with the trace context added."""

    __slots__ = ("span", "extra")

    def __init__(self, span: Any, extra: dict[str, Any]) -> None:
        self.span = span
        self.extra = extra

    def end(self, task_id: str | None, exc: BaseException | None = None) -> None:
        span = self.span
        if task_id is not None:
            span.set_attribute("messaging.message.id", task_id)
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


class PublishTracing:
    """A publisher's tracing: a span per published message while an SDK is configured."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._tracer: Any | None = None
        self._look_at = 0.0

    def active(self) -> bool:
        """Whether publishes are traced now (looks for an SDK at most once per ``RECHECK_SECONDS``)."""
        if self._tracer is not None:
            return True
        now = time.monotonic()
        if now < self._look_at:
            return False
        self._look_at = now + RECHECK_SECONDS
        self._tracer = sdk_tracer()
        return self._tracer is not None

    def start(self, extra: dict[str, Any] | None) -> PublishSpan | None:
        """A started span and ``extra`` with its trace context, or None when not tracing."""
        if self._tracer is None and (_monotonic() < self._look_at or not self.active()):
            return None
        return self.started(extra)

    def started(self, extra: dict[str, Any] | None) -> PublishSpan:
        """:meth:`start` once :meth:`active` said yes."""
        from opentelemetry import propagate, trace

        span = self._tracer.start_span(f"publish {self.queue}", kind=trace.SpanKind.PRODUCER,  # type: ignore[union-attr]
                                       attributes=_attributes(self.queue, "publish"))
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return PublishSpan(span, {**(extra or {}), TRACE_KEY: carrier})


def _attributes(queue: str, operation: str) -> dict[str, str]:
    return {"messaging.system": SYSTEM, "messaging.destination.name": queue, "messaging.operation.name": operation,
            "messaging.operation.type": "send" if operation == "publish" else "process"}


class TracingMiddleware(Middleware):
    """A consumer's ``process`` spans: started in ``on_start``, current during the call, ended in ``after_call``."""

    def __init__(self, consumer: Consumer, tracer: Any) -> None:
        from opentelemetry import context, propagate, trace

        self.queue = consumer.queue_name
        self._tracer = tracer
        self._trace, self._context, self._propagate = trace, context, propagate
        self._open: dict[int, tuple[Any, Any, int]] = {}  # id(call) -> (span, context token, thread)

    def _start(self, call: Call) -> Any:
        carrier = call.extra.get(TRACE_KEY)
        parent = self._propagate.extract(carrier) if isinstance(carrier, dict) else None
        attributes = _attributes(self.queue, "process")
        if call.task_id is not None:
            attributes["messaging.message.id"] = call.task_id
        return self._tracer.start_span(f"process {self.queue}", context=parent, kind=self._trace.SpanKind.CONSUMER,
                                       attributes=attributes)

    def on_start(self, call: Call) -> None:
        span = self._start(call)
        token = self._context.attach(self._trace.set_span_in_context(span))
        self._open[id(call)] = (span, token, threading.get_ident())

    def after_call(self, call: Call) -> None:
        entry = self._open.pop(id(call), None)
        if entry is None:  # skipped before it started (expired, filtered, ...)
            span = self._start(call)
            span.set_attribute("funboost_like.skip_reason", call.skip_reason)
        else:
            span, token, thread = entry
            if thread == threading.get_ident():  # a call abandoned after a timeout ends on another thread
                self._context.detach(token)
        outcome = OUTCOME_NAMES[call.outcome] if 0 <= call.outcome < len(OUTCOME_NAMES) else "unknown"
        span.set_attribute("funboost_like.outcome", outcome)
        span.set_attribute("funboost_like.attempts", call.attempts)
        if call.exc is not None:
            span.record_exception(call.exc)
        if call.outcome in (FAILED, DEAD_LETTERED):
            status = self._trace.Status(self._trace.StatusCode.ERROR, outcome)
            span.set_status(status)
        span.end()


def build(consumer: Consumer) -> TracingMiddleware | None:
    """The feature table's entry: a tracing middleware only while an SDK is configured."""
    tracer = sdk_tracer()
    return TracingMiddleware(consumer, tracer) if tracer is not None else None


def publish_tracing(publisher: Publisher) -> PublishTracing | None:
    """A publisher's tracing, or None when tracing is off or ``opentelemetry-api`` is not installed."""
    if not settings.get("OPENTELEMETRY_TRACING") or not _installed():
        return None
    return PublishTracing(publisher.queue_name)
