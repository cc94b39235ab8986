"""funboost_like: put ``@task_deco("queue")`` on a function, ``push`` calls, ``consume`` them anywhere.

Importing this package performs no I/O, writes no file and patches nothing. The timing-job names
(``fsdf_background_scheduler``, ``timing_publish_deco``, ``FsdfBackgroundScheduler``) are loaded on
first use, so APScheduler is imported only by programs that schedule.
"""

import importlib
from typing import TYPE_CHECKING, Any

from funboost_like.concurrency.greenlets import EventletPool, GeventPool
from funboost_like.concurrency.threads import ThreadPool
from funboost_like.core.booster import Booster, boost, get_consumer, run_consumer_with_multi_process, task_deco
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum, ConcurrentModeEnum
from funboost_like.core.errors import (
    BrokerNotAvailable,
    ConfigurationError,
    ExceptionForRequeue,
    ExceptionForRetry,
    FunboostLikeError,
    FunctionFailedError,
    PublishError,
    ResultNotAvailable,
    TaskSkippedError,
    UnroutableError,
)
from funboost_like.core.params import FunctionResultStatusPersistanceConfig, PriorityConsumingControlConfig
from funboost_like.core.results import AsyncResult
from funboost_like.discovery import Tasks, autodiscover, discover_and_mount_ts, task_function
from funboost_like.middleware.heartbeat import active_consumers

if TYPE_CHECKING:
    from funboost_like.scheduling.timing import FsdfBackgroundScheduler as FsdfBackgroundScheduler
    from funboost_like.scheduling.timing import fsdf_background_scheduler as fsdf_background_scheduler
    from funboost_like.scheduling.timing import timing_publish_deco as timing_publish_deco

ThreadPoolExecutorShrinkAble = ThreadPool  # the seed's name for the framework's own pool

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Booster",
    "BrokerEnum",
    "BrokerNotAvailable",
    "ConcurrentModeEnum",
    "ConfigurationError",
    "EventletPool",
    "ExceptionForRequeue",
    "ExceptionForRetry",
    "FunboostLikeError",
    "FunctionFailedError",
    "FunctionResultStatusPersistanceConfig",
    "GeventPool",
    "PriorityConsumingControlConfig",
    "PublishError",
    "ResultNotAvailable",
    "TaskSkippedError",
    "Tasks",
    "ThreadPool",
    "ThreadPoolExecutorShrinkAble",
    "UnroutableError",
    "active_consumers",
    "autodiscover",
    "boost",
    "discover_and_mount_ts",
    "get_consumer",
    "patch_frame_config",
    "run_consumer_with_multi_process",
    "task_deco",
    "task_function",
]

# Loaded on first use: importing funboost_like must not import APScheduler.
_LAZY = {
    "fsdf_background_scheduler": "funboost_like.scheduling.timing",
    "timing_publish_deco": "funboost_like.scheduling.timing",
    "FsdfBackgroundScheduler": "funboost_like.scheduling.timing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
