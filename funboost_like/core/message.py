"""The message on the wire, and the function-signature checks on both sides of it.

A body is a JSON object: the function's keyword arguments at top level plus one reserved key
``extra`` with ``task_id``, ``publish_time``, ``publish_time_format`` and any publish-time options.
A body without ``extra`` is valid. Publishing checks arguments against the signature and raises
:class:`PublishError` at once; consuming checks them again and dead-letters what does not fit.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from funboost_like.core import arg_cache, codec
from funboost_like.core.errors import ConfigurationError, DecodeError, PublishError

EXTRA_KEY = "extra"

def _reset_task_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()  # a forked child never continues its parent's sequence
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_reset_task_ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_task_ids)


def new_task_id() -> str:
    """A unique id, cheap enough for the publish hot path: a random per-process prefix and a counter."""
    return f"{_id_prefix}{next(_id_counter):08x}"


_format_cache: tuple[int, str] = (-1, "")


def format_publish_time(now: float) -> str:
    """Local time as ``YYYY-mm-dd HH:MM:SS``, cached per second."""
    global _format_cache
    second = int(now)
    cached_second, text = _format_cache
    if cached_second != second:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        _format_cache = (second, text)
    return text


def _refuse_methods(function: Callable[..., Any], sig: inspect.Signature) -> None:
    """A method decorated in its class body (first parameter ``self`` or ``cls``) cannot run from a queue:
    the instance is not in the message (seed 5.8). Say so at decoration, not as a missing argument later."""
    first = next(iter(sig.parameters), None)
    owner, _, _ = getattr(function, "__qualname__", "").rpartition(".")
    if first in ("self", "cls") and owner and not owner.endswith("<locals>"):
        raise ConfigurationError(
            f"{_qualname(function)} is a method (its first parameter is {first!r}): a message cannot carry the "
            f"object it runs on. Decorate a plain function instead, which makes the object and calls the method"
        )


class FunctionSignature:
    """What a consuming function accepts, precomputed so checks cost a few set operations."""

    def __init__(self, function: Callable[..., Any], multi_params: bool = True) -> None:
        self.function = function
        self.multi_params = multi_params
        sig = inspect.signature(function)
        _refuse_methods(function, sig)
        names: list[str] = []
        required: set[str] = set()
        self.accepts_any_keyword = False
        for param in sig.parameters.values():
            if param.kind is param.POSITIONAL_ONLY:
                raise ConfigurationError(
                    f"{_qualname(function)} has positional-only parameter {param.name!r}; messages carry "
                    "keyword arguments, so every parameter must be passable by keyword"
                )
            if param.kind is param.VAR_POSITIONAL:
                raise ConfigurationError(
                    f"{_qualname(function)} takes *{param.name}; messages carry keyword arguments only"
                )
            if param.kind is param.VAR_KEYWORD:
                self.accepts_any_keyword = True
                continue
            if param.name == EXTRA_KEY:
                raise ConfigurationError(f"{_qualname(function)}: the parameter name {EXTRA_KEY!r} is reserved")
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                names.append(param.name)
            if param.default is param.empty:
                required.add(param.name)
        self.positional_names = tuple(names)
        self.names = frozenset(p.name for p in sig.parameters.values() if p.kind not in (p.VAR_KEYWORD,))
        self.required = frozenset(required)
        self.signature = sig

    # -- publish side -------------------------------------------------------------------------
    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Turn ``push(*args, **kwargs)`` into the keyword dict, raising PublishError on a bad call."""
        if not args:
            self.check_keys(kwargs)
            return kwargs
        positional = self.positional_names
        if len(args) == len(positional) and not kwargs:  # every argument given positionally
            return dict(zip(positional, args, strict=True))
        if len(args) > len(positional):
            raise PublishError(f"{_qualname(self.function)}() takes {len(positional)} positional argument(s) "
                               f"but {len(args)} were given")
        bound = dict(zip(positional, args, strict=False))
        if kwargs:
            if not kwargs.keys().isdisjoint(bound):
                twice = sorted(kwargs.keys() & bound.keys())
                raise PublishError(f"{_qualname(self.function)}() got multiple values for argument(s) {twice}")
            bound.update(kwargs)
        self.check_keys(bound)
        return bound

    def check_keys(self, kwargs: Mapping[str, Any]) -> None:
        problem = self.mismatch(kwargs)
        if problem:
            raise PublishError(f"{_qualname(self.function)}(): {problem}")

    def mismatch(self, kwargs: Mapping[str, Any]) -> str:
        """Why ``kwargs`` cannot be passed to the function, or '' when they can."""
        keys = kwargs.keys()
        if not self.accepts_any_keyword and not keys <= self.names:
            unexpected = sorted(set(keys) - self.names)
            return f"unexpected keyword argument(s) {', '.join(map(repr, unexpected))}"
        if not self.required <= keys:
            missing = sorted(self.required - set(keys))
            return f"missing required argument(s) {', '.join(map(repr, missing))}"
        return ""


def _qualname(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", repr(function))


def _number(low: float, *, null: bool = True) -> Callable[[Any], bool]:
    return lambda v: (v is None and null) or (type(v) in (int, float) and math.isfinite(v) and v >= low)


def _flag(value: Any) -> bool:
    return value is None or isinstance(value, bool)


# The options ``extra`` may carry that the consumer acts on, each with its check and what it wants.
_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "function_timeout": (_number(0), "a number >= 0 or None"),
    "max_retry_times": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "msg_expire_senconds": (_number(0), "a number >= 0 or None"),
    "misfire_grace_time": (_number(1), "a number >= 1 or None"),
    "countdown": (_number(0), "a number >= 0 or None"),
    "run_at": (_number(0), "a UNIX time (a number) or None"),  # misfire_grace_time is measured from it
    "is_print_detail_exception": (_flag, "True, False or None"),
    "is_using_rpc_mode": (_flag, "True, False or None"),
}
OPTION_NAMES = frozenset(_OPTIONS)


def option_problem(name: str, value: Any) -> str:
    """Why ``value`` cannot be the message option ``name`` ("" when it can, or when ``name`` is none)."""
    entry = _OPTIONS.get(name)
    if entry is None or entry[0](value):
        return ""
    return f"{name} must be {entry[1]}, got {value!r}"


def encode(kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """Build the wire body for one call; return ``(task_id, body)``. Takes ownership of ``kwargs``."""
    now = time.time()
    task_id = f"{_id_prefix}{next(_id_counter):08x}"
    meta = {"task_id": task_id, "publish_time": now, "publish_time_format": format_publish_time(now)}
    if extra:
        meta.update(extra)
        given = meta["task_id"]  # a hand-written extra may name its own
        if not isinstance(given, str) or not given:
            raise PublishError(f"extra's task_id must be a non-empty string, not {given!r}")
        task_id = given
    message = kwargs
    message[EXTRA_KEY] = meta
    try:
        return task_id, bytes(memoryview(codec.dumps_arguments(message)))
    except (TypeError, ValueError) as exc:
        raise PublishError(f"the call's arguments cannot be encoded as JSON: {exc}{_CACHE_HINT}") from exc


_CACHE_HINT = " (use_cache=True passes such arguments by reference to a consumer in this process)"


def batch_encoder() -> Callable[[dict[str, Any]], tuple[str, bytes]]:
    """An :func:`encode` for the calls of one ``publish_many`` that carry no ``extra`` of their own.

    The calls share one publish time, read when the batch starts, so the end of each body (the
    publish time and its text) is encoded once for the whole batch and each body is the call's
    arguments, its task id and that shared end, joined: the same layout as :func:`encode`'s for
    about half its cost. The returned function does not change ``kwargs``.
    """
    now = time.time()
    shared = codec.dumps({"publish_time": now, "publish_time_format": format_publish_time(now)})
    tail = b'",' + shared[1:] + b"}"  # closes the task id, adds the shared keys, closes extra and the body
    prefix = _id_prefix
    counter = _id_counter
    dumps = codec.dumps_arguments

    def encode_call(kwargs: dict[str, Any]) -> tuple[str, bytes]:
        task_id = f"{prefix}{next(counter):08x}"
        try:
            head = dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise PublishError(f"the call's arguments cannot be encoded as JSON: {exc}{_CACHE_HINT}") from exc
        opening = b'{"extra":{"task_id":"' if len(head) == 2 else head[:-1] + b',"extra":{"task_id":"'
        return task_id, b"".join((opening, task_id.encode("ascii"), tail))

    return encode_call


class DecodedMessage:
    """A message taken apart: the call's keyword arguments and the ``extra`` dict (maybe empty)."""

    __slots__ = ("kwargs", "extra")

    def __init__(self, kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.extra = extra

    @property
    def task_id(self) -> str | None:
        task_id = self.extra.get("task_id")
        return str(task_id) if task_id is not None else None


def decode(body: bytes, signature: FunctionSignature) -> DecodedMessage:
    """Parse and check one body; raise DecodeError with a reason fit for the dead-letter record."""
    try:
        data = codec.loads(body)
    except codec.DecodeFailure as exc:
        raise DecodeError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DecodeError(f"body is JSON but not an object (got {type(data).__name__})")
    extra = data.pop(EXTRA_KEY, None)
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        raise DecodeError(f"the reserved key {EXTRA_KEY!r} must hold an object, got {type(extra).__name__}")
    else:
        if not OPTION_NAMES.isdisjoint(extra):  # a hand-written or foreign message may carry anything
            for name in OPTION_NAMES.intersection(extra):
                problem = option_problem(name, extra[name])
                if problem:
                    raise DecodeError(f"option in {EXTRA_KEY!r}: {problem}")
        cached = extra.get(arg_cache.CACHE_KEY)
        if cached is not None:  # cache mode: the arguments JSON could not carry are in this process
            arg_cache.take(data, cached)
    if signature.multi_params:
        problem = signature.mismatch(data)
        if problem:
            raise DecodeError(f"keys do not fit {_qualname(signature.function)}(): {problem}")
    return DecodedMessage(data, extra)


def _with_extra(body: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A message body as (data, its ``extra``), or None for a body that is no message with an ``extra``."""
    try:
        data = codec.loads(body)
    except codec.DecodeFailure:
        return None
    extra = data.get(EXTRA_KEY) if isinstance(data, dict) else None
    return (data, extra) if isinstance(extra, dict) else None


def republished(body: bytes, now: float) -> bytes:
    """``body`` published again at ``now`` (a dead letter requeued): its publish time is ``now`` (the first
    one kept as ``first_publish_time``) and its countdown or eta is dropped, so it is not taken for expired
    or misfired, nor counted as waiting since its first publish. A body that is no message is kept as is."""
    found = _with_extra(body)
    if found is None:
        return body
    data, extra = found
    extra = {key: value for key, value in extra.items() if key not in ("run_at", "countdown", "eta")}
    extra.setdefault("first_publish_time", extra.get("publish_time"))
    extra.update(publish_time=now, publish_time_format=format_publish_time(now))
    return bytes(codec.dumps({**data, EXTRA_KEY: extra}))


def due_time(body: bytes) -> float | None:
    """When a message became due: its ``run_at`` (a countdown or eta), else its publish time; None for a
    body that carries neither (written by hand) or is not a message at all."""
    found = _with_extra(body)
    if found is None:
        return None
    extra = found[1]
    due = extra.get("run_at", extra.get("publish_time"))
    return float(due) if isinstance(due, (int, float)) and not isinstance(due, bool) else None
