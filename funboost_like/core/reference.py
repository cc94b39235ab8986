"""Textual references to boosters: ``"package.module:qualname"`` of the decorated function.

A reference lets another process (a spawned consumer child, a scheduler that loads a job from a
persistent job store) find the same :class:`~funboost_like.core.booster.Booster` by importing the
module that defines it, instead of pickling the booster with its broker connections and locks.

Only a booster bound to a name at the top level of a module (or as a class attribute) has a
reference; one created inside a function body does not (its qualname holds ``<locals>``).

A booster defined in the script that was started (module ``__main__``) is referred to by the
script's module name when it was started with ``python -m package.module``, and as
``__main__:name`` otherwise; resolving a ``__main__`` reference in another process finds the
booster in *that* process's main script, so every process must run the same script.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

from funboost_like.core.errors import FunboostLikeError

if TYPE_CHECKING:
    from funboost_like.core.booster import Booster

MAIN = "__main__"

_known: dict[str, Booster[Any, Any]] = {}  # references made or resolved in this process
_lock = threading.Lock()


class BoosterReferenceError(FunboostLikeError, LookupError):
    """A booster has no reference, or a reference does not lead to a booster."""


def _main_module_name() -> str:
    """The importable name of the started script (``python -m pkg.mod``), or ``__main__``."""
    spec = getattr(sys.modules.get(MAIN), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if isinstance(name, str) and name and name != MAIN else MAIN


def _walk(module: ModuleType, qualname: str) -> Any:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def booster_reference(booster: Booster[Any, Any]) -> str:
    """Return ``"module:qualname"`` for ``booster``; raise :class:`BoosterReferenceError` if it has none."""
    module_name = getattr(booster, "__module__", None)
    qualname = getattr(booster, "__qualname__", None)
    if not isinstance(module_name, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        raise BoosterReferenceError(
            f"{booster!r} cannot be found again by reference: define the decorated function at the top "
            f"level of a module (found module={module_name!r}, qualname={qualname!r})"
        )
    module = sys.modules.get(module_name)
    try:
        found = _walk(module, qualname) if module is not None else None
    except AttributeError:
        found = None
    if found is not booster:
        raise BoosterReferenceError(
            f"{booster!r} is not reachable as {module_name}:{qualname}: the module attribute of that name is "
            f"{type(found).__name__}; keep the decorated function bound to its own name"
        )
    if module_name == MAIN:
        module_name = _main_module_name()
    ref = f"{module_name}:{qualname}"
    with _lock:
        _known[ref] = booster
    return ref


def resolve_booster(ref: str) -> Booster[Any, Any]:
    """Find the booster that ``ref`` names, importing its module when needed."""
    from funboost_like.core.booster import Booster

    booster = _known.get(ref)
    if booster is not None:
        return booster
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise BoosterReferenceError(f"{ref!r} is not a booster reference of the form 'package.module:qualname'")
    try:
        if module_name == MAIN or module_name == _main_module_name():
            module = sys.modules[MAIN]  # the started script itself: never import it a second time
        else:
            module = importlib.import_module(module_name)
        found = _walk(module, qualname)
    except (ImportError, AttributeError, KeyError) as exc:
        raise BoosterReferenceError(f"cannot resolve booster reference {ref!r}: {exc}") from exc
    if not isinstance(found, Booster):
        raise BoosterReferenceError(f"{ref!r} names a {type(found).__name__}, not a function decorated with task_deco")
    with _lock:
        _known[ref] = found
    return found
