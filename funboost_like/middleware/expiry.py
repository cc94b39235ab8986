"""Message expiry (``msg_expire_senconds``, seed 1.0.1) and misfire grace of delayed messages (seed 2.9).

A message older than its expiry when its turn comes, or a delayed message whose due time passed
more than ``misfire_grace_time`` seconds ago, is dropped: acknowledged without running, counted as
skipped and logged. Both can also be given per message at publish time. Only a message's first
delivery is checked: a retry with backoff, or a call run again after its consumer died, had its turn.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from funboost_like.core.calls import Call, Middleware
from funboost_like.core.params import check_non_negative

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams


class PublishTimeLimits(Middleware):
    def __init__(self, expire_seconds: float) -> None:
        self.expire_seconds = expire_seconds

    def before_call(self, call: Call) -> str | None:
        if call.delivery.attempts > 1:  # its turn came before: a retry (or a rerun after a death) is never dropped
            return None
        extra = call.message.extra
        limit = extra.get("msg_expire_senconds", self.expire_seconds)
        if limit:
            published = extra.get("publish_time")
            if isinstance(published, (int, float)):
                age = time.time() - published
                if age > limit:
                    return f"expired: published {age:.1f}s ago, msg_expire_senconds={limit}"
        if "misfire_grace_time" not in extra:
            return None
        grace = extra["misfire_grace_time"]
        run_at = extra.get("run_at")
        if grace is not None and isinstance(run_at, (int, float)):
            late = time.time() - run_at
            if late > grace:
                return f"misfired: due {late:.1f}s ago, misfire_grace_time={grace}"
        return None


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    check_non_negative(params, "msg_expire_senconds")


def build(consumer: Consumer) -> Middleware:
    return PublishTimeLimits(consumer.params.msg_expire_senconds)
