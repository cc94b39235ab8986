"""Timing jobs: publish calls on a schedule (APScheduler 3.x, the ``scheduler`` extra).

Nothing here imports APScheduler until one of its names is used: ``fsdf_background_scheduler``,
``timing_publish_deco``, ``FsdfBackgroundScheduler``, ``publish_by_reference`` (timing.py),
``SQLiteJobStore``, ``RedisJobStore`` and ``SQLAlchemyJobStore`` (jobstores.py, which keep jobs as
JSON: job_codec.py). The fire-time locks (fire_lock.py) need no APScheduler.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "fsdf_background_scheduler": "funboost_like.scheduling.timing",
    "timing_publish_deco": "funboost_like.scheduling.timing",
    "FsdfBackgroundScheduler": "funboost_like.scheduling.timing",
    "TimingJobExecutor": "funboost_like.scheduling.timing",
    "publish_by_reference": "funboost_like.scheduling.timing",
    "SQLiteJobStore": "funboost_like.scheduling.jobstores",
    "RedisJobStore": "funboost_like.scheduling.jobstores",
    "SQLAlchemyJobStore": "funboost_like.scheduling.jobstores",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
