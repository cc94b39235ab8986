"""Seed 002's names: task discovery (``discover_and_mount_ts``) and its decorator ``task_function``.

``autodiscover("app.engine")`` imports the package and every module and subpackage under it, so
each ``@task_deco`` in them runs, and returns the decorated functions found at the top level of
those modules, by queue name. Nothing is imported until it is called; an import error in one of the
modules propagates, naming that module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from funboost_like.core.booster import Booster, ConsumerOptions, task_deco
from funboost_like.core.errors import ConfigurationError

if TYPE_CHECKING:
    from typing_extensions import Unpack

P = ParamSpec("P")
R = TypeVar("R")


class Tasks(dict[str, Booster[Any, Any]]):
    """Queue name -> decorated function."""

    def get_all_task_names(self) -> list[str]:
        return sorted(self)


def autodiscover(package: str) -> Tasks:
    """Import ``package`` and everything under it; return its decorated functions by queue name."""
    root = importlib.import_module(package)
    modules = [root]
    if hasattr(root, "__path__"):
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{root.__name__}.", onerror=_raise):
            modules.append(importlib.import_module(info.name))
    tasks = Tasks()
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, Booster):
                known = tasks.setdefault(value.queue_name, value)
                if known is not value:
                    raise ConfigurationError(f"two functions consume queue {value.queue_name!r}: "
                                             f"{_where(known)} and {_where(value)}")
    return tasks


def _where(booster: Booster[Any, Any]) -> str:
    function = booster.consuming_function
    return f"{function.__module__}.{function.__qualname__}"


def _raise(name: str) -> None:
    raise ImportError(f"autodiscover could not import package {name!r}")


discover_and_mount_ts = autodiscover  # seed 002's name


@overload
def task_function(function: Callable[P, R], /) -> Booster[P, R]: ...


@overload
def task_function(function: None = None, /, *, queue_name: str | None = None,
                  **params: Unpack[ConsumerOptions]) -> Callable[[Callable[P, R]], Booster[P, R]]: ...


def task_function(function: Callable[..., Any] | None = None, /, *, queue_name: str | None = None,
                  **params: Any) -> Any:
    """Seed 002's decorator: ``task_deco`` on a queue named after the function (seed 002 calls a task
    by its function's name), with ``task_deco``'s parameters (``use_cache=True``, ``concurrent_num=5``,
    ...). ``@task_function``, ``@task_function()`` and ``@task_function(queue_name="q", ...)``."""

    def decorate(target: Callable[..., Any]) -> Booster[Any, Any]:
        return task_deco(queue_name or target.__name__, **params)(target)

    return decorate if function is None else decorate(function)
