"""funboost_like: put ``@task_deco("queue")`` on a function, ``push`` calls, ``consume`` them anywhere.

Importing this package performs no I/O, writes no file and patches nothing.
"""

from funboost_like.core.booster import Booster, boost, get_consumer, task_deco
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum, ConcurrentModeEnum
from funboost_like.core.errors import (
    BrokerNotAvailable,
    ConfigurationError,
    ExceptionForRequeue,
    ExceptionForRetry,
    FunboostLikeError,
    PublishError,
)
from funboost_like.core.params import FunctionResultStatusPersistanceConfig, PriorityConsumingControlConfig
from funboost_like.core.results import AsyncResult

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Booster",
    "BrokerEnum",
    "BrokerNotAvailable",
    "ConcurrentModeEnum",
    "ConfigurationError",
    "ExceptionForRequeue",
    "ExceptionForRetry",
    "FunboostLikeError",
    "FunctionResultStatusPersistanceConfig",
    "PriorityConsumingControlConfig",
    "PublishError",
    "boost",
    "get_consumer",
    "patch_frame_config",
    "task_deco",
]
