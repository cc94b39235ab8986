"""One DEBUG line per successful run (seed 004: ``log_level`` is DEBUG by default "so that you see the
details of each run"; INFO (20) hides them).

Built only when the queue's logger is enabled for DEBUG when the consumer is made (``log_level=10``,
the default), so a consumer at INFO or above pays nothing per message. Failures, retries, skips and
dead letters are logged by the consumer itself at INFO and above. Arguments and results are shown
abbreviated (:mod:`reprlib`), so a large argument never floods the log.
"""

from __future__ import annotations

import logging
import reprlib
from typing import TYPE_CHECKING

from funboost_like.core.calls import SUCCEEDED, Call, Middleware

if TYPE_CHECKING:
    from funboost_like.core.consumer import Consumer

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


class RunLog(Middleware):
    def __init__(self, logger: logging.Logger, function_name: str) -> None:
        self.logger = logger
        self.function_name = function_name

    def after_call(self, call: Call) -> None:
        if call.outcome == SUCCEEDED:
            arguments = ", ".join([f"{name}={_short.repr(value)}" for name, value in call.message.kwargs.items()])
            runs = call.runs
            self.logger.debug("task %s: %s(%s) succeeded in %.4fs (run %d), result %s", call.log_id,
                              self.function_name, arguments, call.duration, runs, _short.repr(call.result))


def build(consumer: Consumer) -> RunLog | None:
    if not consumer.logger.isEnabledFor(logging.DEBUG):
        return None
    return RunLog(consumer.logger, getattr(consumer.function, "__name__", repr(consumer.function)))
