"""Task discovery (seed 002's ``discover_and_mount_ts``): import a package's modules, find their functions.

``autodiscover("app.engine")`` imports the package and every module and subpackage under it, so
each ``@task_deco`` in them runs, and returns the decorated functions found at the top level of
those modules, by queue name. Nothing is imported until it is called; an import error in one of the
modules propagates, naming that module.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from funboost_like.core.booster import Booster
from funboost_like.core.errors import ConfigurationError


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
