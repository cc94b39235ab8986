"""Message expiry demo: messages older than msg_expire_senconds when their turn comes are dropped."""

from __future__ import annotations

from funboost_like import BrokerEnum, task_deco


@task_deco("expiry_demo", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, msg_expire_senconds=1, qps=5)
def quote(item: int) -> None:
    print(f"quoting item {item}")


if __name__ == "__main__":
    for item in range(20):  # at 5 per second, the last ones wait more than 1 s: they are dropped
        quote.push(item)
    quote.consume()
    quote.broker.join(quote.queue_name, timeout=30)  # type: ignore[attr-defined]
    stats = quote.consumer.stats.as_dict()
    print(f"ran {stats['succeeded']}, dropped as expired {stats['skipped']}")
    quote.stop()
