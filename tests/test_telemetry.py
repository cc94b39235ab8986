"""OpenTelemetry: a publish in one process and its consume in another share one trace (the SDK's in-memory
exporter in each); without an SDK nothing is traced and nothing is added to messages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, patch_frame_config, task_deco
from funboost_like.brokers.registry import get_broker
from tests.conftest import subprocess_env

trace = pytest.importorskip("opentelemetry.trace")
pytest.importorskip("opentelemetry.sdk.trace")

from funboost_like.observability.tracing import TRACE_KEY, TracingMiddleware  # noqa: E402

_SIDE = textwrap.dedent("""
    import json, logging, sys, time
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    from funboost_like import BrokerEnum, task_deco

    role, queue = sys.argv[1], sys.argv[2]

    @task_deco(queue, broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.CRITICAL, max_retry_times=0)
    def f(x):
        with trace.get_tracer("user").start_as_current_span("inside"):
            if x == "fail":
                raise ValueError("fails")

    if role == "publish":
        f.push("secret-argument")
        f.publish_many([{"x": "fail"}])
    else:
        f.consume()
        while sum(f.consumer.stats.counts) < 2:
            time.sleep(0.01)
        f.consumer.stop()
        f.consumer.join(10)
    print(json.dumps([{"name": s.name, "trace": s.context.trace_id, "span": s.context.span_id,
                       "parent": s.parent.span_id if s.parent else None, "kind": s.kind.name,
                       "status": s.status.status_code.name, "attributes": dict(s.attributes)}
                      for s in exporter.get_finished_spans()]))
""")


def run_side(role: str, queue: str, script: Path, settings_folder: Path) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, str(script), role, queue], env=subprocess_env(settings_folder),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    spans: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return spans


def test_a_trace_crosses_processes(queue_name: str, tmp_path: Path, isolated_settings: Path) -> None:
    script = tmp_path / "side.py"
    script.write_text(_SIDE)
    published = run_side("publish", queue_name, script, isolated_settings)
    consumed = run_side("consume", queue_name, script, isolated_settings)

    assert [(s["name"], s["kind"]) for s in published] == [(f"publish {queue_name}", "PRODUCER")] * 2
    processes = {s["attributes"]["messaging.message.id"]: s for s in consumed if s["name"] == f"process {queue_name}"}
    assert len(processes) == 2
    for publish in published:
        process = processes[publish["attributes"]["messaging.message.id"]]
        assert process["kind"] == "CONSUMER"
        assert process["trace"] == publish["trace"] and process["parent"] == publish["span"]
        [inside] = [s for s in consumed if s["name"] == "inside" and s["parent"] == process["span"]]
        assert inside["trace"] == publish["trace"]  # the function's own spans join the trace
    assert published[0]["trace"] != published[1]["trace"]  # one trace per call
    outcomes = sorted((s["attributes"]["funboost_like.outcome"], s["status"]) for s in processes.values())
    assert outcomes == [("failed", "ERROR"), ("succeeded", "UNSET")]
    assert "secret-argument" not in json.dumps(published + consumed)  # arguments never go into spans


def test_without_an_sdk_nothing_is_traced(queue_name: str) -> None:
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a tracer provider was set in this test process")

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.push(1)
    f.publish({"x": 2})
    f.publish_many([{"x": 3}])
    broker = get_broker(BrokerEnum.PERSISTQUEUE)
    deliveries = broker.fetch(queue_name, 10, 1.0)
    assert len(deliveries) == 3
    assert not any(TRACE_KEY.encode() in delivery.body for delivery in deliveries)
    broker.release(deliveries)
    assert not any(isinstance(m, TracingMiddleware) for m in f.consumer.middlewares)  # no per-call work at all


def test_the_setting_turns_tracing_off(queue_name: str) -> None:
    patch_frame_config(OPENTELEMETRY_TRACING=False)

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    assert f.publisher._tracing is None
