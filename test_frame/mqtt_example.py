"""MQTT (kind MQTT), the seed's example (section 6.18), plus its result-to-topic pattern.

    python test_frame/mqtt_example.py

Needs an MQTT 5 server at MQTT_URL (default ``mqtt://127.0.0.1:1883``, environment variable
``FUNBOOST_LIKE_MQTT_URL``), for example Mosquitto 2. The seed pushes 100 calls and then starts
consuming: on its at-most-once kind those pushes are lost when no consumer is subscribed yet; here the
queue's session keeps them. Each call's RPC result is also published to the topic
``funboost_like/kv/mqtt_topic_test/results/<task_id>``: a browser (MQTT over WebSocket) or any other
program subscribes to it and gets the result without polling an HTTP interface. Below, a plain
paho-mqtt client plays that part. docs/mqtt.md describes the layout and the guarantees.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho

from funboost_like import BrokerEnum, task_deco
from funboost_like.core.config import settings

QUEUE = "mqtt_topic_test"
task_ids: set[str] = set()  # this run's calls (a result topic keeps its last result for an hour: retained)
results: dict[str, Any] = {}
all_results = threading.Event()


@task_deco(QUEUE, broker_kind=BrokerEnum.MQTT, is_using_rpc_mode=True)
def f(x: int, y: int) -> int:
    print(f""" {x} + {y} = {x + y}""")
    return x + y


def listen_like_a_browser() -> paho.Client:
    """Subscribe to every result topic of the queue, as a web page would with MQTT over WebSocket."""
    url = urlsplit(str(settings.get("MQTT_URL")))

    def on_message(_client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        record = json.loads(message.payload)
        if record["task_id"] in task_ids:
            results[record["task_id"]] = record["result"]
            if len(results) == 100:
                all_results.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if url.username:
        client.username_pw_set(url.username, url.password)
    client.on_message = on_message
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.subscribe(f"funboost_like/kv/{QUEUE}/results/+", qos=1)
    client.loop_start()
    return client


def main() -> int:
    f.clear()
    listener = listen_like_a_browser()
    task_ids.update(f.push(i, i * 2).task_id for i in range(100))
    f.consume()
    try:
        if not all_results.wait(60):
            print(f"only {len(results)} of 100 results arrived on the result topics", file=sys.stderr)
            return 1
    finally:
        listener.disconnect()
        listener.loop_stop()
    expected = sum(3 * i for i in range(100))
    print(f"100 results arrived on their topics; sum {sum(results.values())} (expected {expected})")
    f.stop()
    f.consumer.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
