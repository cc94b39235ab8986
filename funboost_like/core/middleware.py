"""Features around the consume path, one small class each, never branches inside the loop.

A middleware overrides only the hooks it needs. ``before_call`` may return a reason string to skip
the call (the message is then acknowledged without running, and the reason logged); ``after_call``
sees every outcome. A hook that raises is logged and does not take the consumer down.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from funboost_like.core.message import DecodedMessage
    from funboost_like.core.params import ConsumerParams


class Middleware:
    def before_call(self, message: DecodedMessage) -> str | None:
        return None

    def after_call(self, message: DecodedMessage, result: Any, exc: BaseException | None) -> None:
        return None


class MessageExpiry(Middleware):
    """Drop a message older than ``msg_expire_senconds`` when its turn comes (seed 1.0.1)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def before_call(self, message: DecodedMessage) -> str | None:
        extra = message.extra
        limit = extra.get("msg_expire_senconds", self.seconds)
        published = extra.get("publish_time")
        if limit and isinstance(published, (int, float)) and time.time() - published > limit:
            return f"expired: published {time.time() - published:.1f}s ago, limit {limit}s"
        return None


class MisfireGrace(Middleware):
    """Drop a delayed message whose due time passed more than ``misfire_grace_time`` ago (seed 2.9)."""

    def before_call(self, message: DecodedMessage) -> str | None:
        extra = message.extra
        grace = extra.get("misfire_grace_time")
        run_at = extra.get("run_at")
        if grace is not None and isinstance(run_at, (int, float)) and time.time() - run_at > grace:
            return f"misfired: due {time.time() - run_at:.1f}s ago, misfire_grace_time {grace}s"
        return None


def build_middlewares(params: ConsumerParams) -> list[Middleware]:
    """The middlewares a consumer with these parameters needs, in order."""
    chain: list[Middleware] = [MessageExpiry(params.msg_expire_senconds), MisfireGrace()]
    return chain
