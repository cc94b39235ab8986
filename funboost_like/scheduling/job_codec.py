"""JSON text for the state of an APScheduler 3.x job: what the persistent job stores keep.

APScheduler's own stores keep ``Job.__getstate__()`` in a binary object format whose loading can
run any code, so whoever can write to the store runs code in every scheduler that loads it. These
stores keep JSON instead, and loading a job only rebuilds known, inert objects (a trigger of a
built-in kind, datetimes, numbers, text). One job's state, version ``"codec": 1``::

    {"codec": 1, "id": "report", "name": "publish to q (pkg.tasks:report)",
     "func": "funboost_like.scheduling.timing:publish_by_reference",
     "args": ["pkg.tasks:report", [], {"day": 1}], "kwargs": {},
     "trigger": {"type": "cron", "timezone": "Europe/Paris", "start_date": null, "end_date": null,
                 "jitter": null, "fields": {"year": "*", "month": "*", "day": "*", "week": "*",
                 "day_of_week": "mon-fri", "hour": "8", "minute": "30", "second": "0"},
                 "default_fields": ["year", "month", "day", "week", "second"]},
     "executor": "default", "misfire_grace_time": 1, "coalesce": true, "max_instances": 1,
     "next_run_time": "2030-01-07T08:30:00+01:00"}

* ``func`` is a text reference, and only :data:`ALLOWED_FUNCTIONS` are accepted: a stored reference
  is code that every scheduler would call with stored arguments (``"os:system"`` would do), so only
  timing publish jobs (``publish_by_reference("module:qualname", args, kwargs)``, which can do no
  more than publish a call of a decorated function) are kept in a persistent store.
* ``args`` / ``kwargs``: JSON values (the arguments of a publish); tuples come back as lists, except
  the publish call's own argument tuple.
* Datetimes: ISO 8601 with their UTC offset, brought back into the trigger's time zone.
* Time zones: an IANA name (a ``zoneinfo`` key), ``"UTC"``, or a fixed offset ``"+08:00"``.
* Triggers: ``date`` (``run_date``), ``interval`` (``seconds``, a float), ``cron`` (each field's
  expression ``str(field)``, rebuilt through ``CronTrigger(...)``), each with ``start_date``,
  ``end_date``, ``timezone`` and ``jitter`` where the trigger has them. Other triggers are refused.

:func:`encode_job` raises :class:`~funboost_like.core.errors.ConfigurationError` for a job it cannot
store (so the job is refused when it is added, with the reason); :func:`decode_job` raises
:class:`JobStateError` for stored text it does not accept, and never falls back to anything else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.job import Job
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from funboost_like.core.errors import ConfigurationError, FunboostLikeError

CODEC_VERSION = 1
PUBLISH_BY_REFERENCE = "funboost_like.scheduling.timing:publish_by_reference"
ALLOWED_FUNCTIONS = frozenset({PUBLISH_BY_REFERENCE})
TRIGGER_KINDS = ("date", "interval", "cron")

_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")
_BOOSTER_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_JOB_KEYS = frozenset({"codec", "id", "func", "args", "kwargs", "trigger", "executor", "name",
                       "misfire_grace_time", "coalesce", "max_instances", "next_run_time"})


class JobStateError(FunboostLikeError, ValueError):
    """Stored job state that is not a job this codec writes (damaged, tampered with, or from elsewhere)."""


# -- encoding ---------------------------------------------------------------------------------------


def encode_job(job: Job, defaults: Mapping[str, Any] | None = None) -> str:
    """The job's state as JSON text; :class:`ConfigurationError` if it cannot be stored as such.

    Reads the attributes ``Job.__getstate__`` reads. A job added while its scheduler is stopped gets
    ``misfire_grace_time``, ``coalesce``, ``max_instances`` and its next run time only when the
    scheduler starts: until then they are taken from ``defaults`` (the scheduler's job defaults), and
    the next run time is ``null``.
    """

    def option(name: str) -> Any:
        return getattr(job, name) if hasattr(job, name) or defaults is None else defaults.get(name)

    func = getattr(job, "func_ref", None)
    if func not in ALLOWED_FUNCTIONS:
        raise _refuse(job, f"its function {func or getattr(job, 'func', None)!r} is not a timing publish job. A "
                           "persistent store keeps only jobs made with timing_publish_deco(...) or "
                           "add_timing_publish_job(...), because a stored function reference is code that every "
                           "scheduler would run; keep other jobs in a memory job store")
    try:
        document = {
            "codec": CODEC_VERSION,
            "id": _text(job.id, "id"),
            "name": _text(job.name, "name"),
            "func": func,
            "args": _json_value(list(job.args), "args"),
            "kwargs": _json_value(dict(job.kwargs), "kwargs"),
            "trigger": encode_trigger(job.trigger),
            "executor": _text(job.executor, "executor"),
            "misfire_grace_time": _optional_seconds(option("misfire_grace_time"), "misfire_grace_time"),
            "coalesce": _boolean(option("coalesce"), "coalesce"),
            "max_instances": _count(option("max_instances"), "max_instances"),
            "next_run_time": _encode_datetime(getattr(job, "next_run_time", None), "next_run_time"),
        }
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        decode_job(text, document["id"])  # what is stored must load again
    except (ConfigurationError, TypeError, ValueError, RecursionError) as exc:  # JobStateError is a ValueError
        raise _refuse(job, str(exc)) from None
    return text


def _refuse(job: Job, reason: str) -> ConfigurationError:
    return ConfigurationError(f"job {getattr(job, 'id', '?')!r} cannot be kept in a persistent job store "
                              f"(JSON job state): {reason}")


def encode_trigger(trigger: Any) -> dict[str, Any]:
    """The trigger as a JSON object; :class:`ConfigurationError` for a trigger that is not built in."""
    kind = type(trigger)
    if kind is DateTrigger:
        run_date = trigger.run_date
        return {"type": "date", "run_date": _encode_datetime(run_date, "run_date"),
                "timezone": encode_timezone(run_date.tzinfo)}
    if kind is IntervalTrigger:
        return {"type": "interval", "seconds": trigger.interval.total_seconds(), **_common(trigger)}
    if kind is CronTrigger:
        return {"type": "cron", **_common(trigger),
                "fields": {field.name: str(field) for field in trigger.fields},
                "default_fields": [field.name for field in trigger.fields if field.is_default]}
    raise ConfigurationError(f"the trigger {trigger!r} ({kind.__module__}.{kind.__qualname__}) cannot be "
                             f"stored as JSON; use one of the built-in triggers: {', '.join(TRIGGER_KINDS)}")


def _common(trigger: IntervalTrigger | CronTrigger) -> dict[str, Any]:
    return {"timezone": encode_timezone(trigger.timezone),
            "start_date": _encode_datetime(trigger.start_date, "start_date"),
            "end_date": _encode_datetime(trigger.end_date, "end_date"),
            "jitter": _optional_seconds(trigger.jitter, "jitter")}


def encode_timezone(zone: tzinfo | None) -> str:
    """An IANA name (zoneinfo key), ``"UTC"`` or ``"+HH:MM"``; :class:`ConfigurationError` otherwise."""
    if isinstance(zone, ZoneInfo) and zone.key:
        try:
            ZoneInfo(zone.key)
        except (ZoneInfoNotFoundError, ValueError):
            pass  # e.g. a zone read from a file under a made-up key: not a name another process can load
        else:
            return str(zone.key)
    elif isinstance(zone, timezone):
        offset = zone.utcoffset(None)
        if offset == timedelta(0):
            return "UTC"
        minutes, rest = divmod(offset, timedelta(minutes=1))
        if not rest:
            sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
            return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    else:
        name = getattr(zone, "zone", None)  # pytz
        if isinstance(name, str) and name:
            try:
                return encode_timezone(ZoneInfo(name))
            except (ZoneInfoNotFoundError, ValueError):
                pass
    raise ConfigurationError(f"the time zone {zone!r} has no IANA name; give the scheduler or the trigger a "
                             "zoneinfo time zone such as 'Europe/Paris' (or 'UTC')")


def _encode_datetime(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ConfigurationError(f"{what} must be a datetime with a time zone, not {value!r}")
    return value.isoformat()


def _json_value(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (tuples become lists); ConfigurationError naming what does not fit."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError(f"{where} is {value!r}, which JSON cannot hold")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigurationError(f"{where} has the key {key!r}; JSON object keys are text")
            result[key] = _json_value(item, f"{where}[{key!r}]")
        return result
    raise ConfigurationError(f"{where} is a {type(value).__name__} ({value!r}), which is not JSON "
                             "(text, numbers, booleans, null, lists and objects with text keys)")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be text, not {value!r}")
    return value


def _boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{what} must be true or false, not {value!r}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a whole number of at least 1, not {value!r}")
    return value


def _optional_seconds(value: Any, what: str) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{what} must be a number of seconds or null, not {value!r}")
    return value


# -- decoding ---------------------------------------------------------------------------------------


def decode_job(text: str | bytes, job_id: str | None = None) -> Job:
    """Rebuild a job (not yet bound to a scheduler) from :func:`encode_job`'s text.

    ``job_id``, when given, is the id the store filed the text under: it must match the stored one.
    Raises :class:`JobStateError` for anything else, saying what is wrong.
    """
    if isinstance(text, bytes):
        # 0x80 starts APScheduler's (and earlier funboost_like's) pickle format, which is never loaded here.
        if text[:1] == b"\x80":
            raise JobStateError("the job state is in APScheduler's binary format, which is never loaded; "
                                "add the job again (with replace_existing=True) to store it as JSON")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobStateError(f"the job state is not UTF-8 JSON text: {exc}") from None
    if not isinstance(text, str):
        raise JobStateError(f"the job state is a {type(text).__name__}, not JSON text")
    try:
        state = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise JobStateError(f"the job state is not valid JSON: {exc}") from None
    try:
        return _decode_state(state, job_id)
    except JobStateError:
        raise
    except (ConfigurationError, TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
        raise JobStateError(f"the job state is not a valid job: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _decode_state(state: Any, job_id: str | None) -> Job:
    if not isinstance(state, dict):
        raise JobStateError(f"the job state is a JSON {type(state).__name__}, not an object")
    if state.get("codec") != CODEC_VERSION:
        raise JobStateError(f"the job state has codec version {state.get('codec')!r}; this version of "
                            f"funboost_like reads version {CODEC_VERSION}")
    if set(state) != _JOB_KEYS:
        missing, extra = sorted(_JOB_KEYS - set(state)), sorted(set(state) - _JOB_KEYS)
        raise JobStateError(f"the job state's keys are wrong (missing {missing}, unexpected {extra})")
    stored_id = _text(state["id"], "id")
    if job_id is not None and stored_id != job_id:
        raise JobStateError(f"the job state names job {stored_id!r} but is stored as job {job_id!r}")
    func = state["func"]
    if func not in ALLOWED_FUNCTIONS:
        raise JobStateError(f"the job's function {func!r} is not one a stored job may call "
                            f"({', '.join(sorted(ALLOWED_FUNCTIONS))}); it is not loaded")
    args, kwargs = _publish_arguments(state["args"], state["kwargs"])
    trigger = decode_trigger(state["trigger"])
    job = Job.__new__(Job)
    job.__setstate__({
        "version": 1,
        "id": stored_id,
        "func": func,  # one of ALLOWED_FUNCTIONS, so importing it runs nothing the store chose
        "trigger": trigger,
        "executor": _text(state["executor"], "executor"),
        "args": args,
        "kwargs": kwargs,
        "name": _text(state["name"], "name"),
        "misfire_grace_time": _optional_seconds(state["misfire_grace_time"], "misfire_grace_time"),
        "coalesce": _boolean(state["coalesce"], "coalesce"),
        "max_instances": _count(state["max_instances"], "max_instances"),
        "next_run_time": _decode_datetime(state["next_run_time"], "next_run_time", _zone_of(trigger)),
    })
    return job


def _publish_arguments(args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``publish_by_reference``'s arguments: ``[ref, [args...], {kwargs...}]`` and no keywords."""
    if kwargs != {}:
        raise JobStateError(f"a publish job takes no keyword arguments, got {kwargs!r}")
    if not (isinstance(args, list) and len(args) == 3 and isinstance(args[0], str)
            and isinstance(args[1], list) and isinstance(args[2], dict)):
        raise JobStateError("a publish job's arguments must be [\"module:qualname\", [args...], {kwargs...}]")
    ref, call_args, call_kwargs = args
    if not _BOOSTER_REF.fullmatch(ref):
        raise JobStateError(f"{ref!r} is not a booster reference of the form 'package.module:qualname'")
    return (ref, tuple(call_args), call_kwargs), {}


def decode_trigger(data: Any) -> DateTrigger | IntervalTrigger | CronTrigger:
    """Rebuild a trigger from :func:`encode_trigger`'s object."""
    if not isinstance(data, dict):
        raise JobStateError(f"the trigger is {data!r}, not a JSON object")
    kind = data.get("type")
    if kind == "date":
        _expect_keys(data, {"type", "run_date", "timezone"})
        zone = decode_timezone(data["timezone"])
        run_date = _decode_datetime(data["run_date"], "run_date", zone)
        if run_date is None:
            raise JobStateError("a date trigger needs a run_date")
        return DateTrigger(run_date=run_date, timezone=zone)
    if kind == "interval":
        _expect_keys(data, {"type", "seconds", "timezone", "start_date", "end_date", "jitter"})
        seconds = data["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 1e12:
            raise JobStateError(f"an interval must be a positive number of seconds, not {seconds!r}")
        zone = decode_timezone(data["timezone"])
        return IntervalTrigger(seconds=seconds, timezone=zone, jitter=_optional_seconds(data["jitter"], "jitter"),
                               start_date=_decode_datetime(data["start_date"], "start_date", zone),
                               end_date=_decode_datetime(data["end_date"], "end_date", zone))
    if kind == "cron":
        return _decode_cron(data)
    raise JobStateError(f"the trigger type {kind!r} is not one of {', '.join(TRIGGER_KINDS)}")


def _decode_cron(data: dict[str, Any]) -> CronTrigger:
    _expect_keys(data, {"type", "timezone", "start_date", "end_date", "jitter", "fields", "default_fields"})
    fields, defaults = data["fields"], data["default_fields"]
    if not isinstance(fields, dict) or set(fields) != set(CronTrigger.FIELD_NAMES) \
            or not all(isinstance(expr, str) for expr in fields.values()):
        raise JobStateError(f"a cron trigger needs the expressions of {', '.join(CronTrigger.FIELD_NAMES)} "
                            f"as text, got {fields!r}")
    if not isinstance(defaults, list) or not set(defaults) <= set(CronTrigger.FIELD_NAMES):
        raise JobStateError(f"default_fields must list cron field names, not {defaults!r}")
    zone = decode_timezone(data["timezone"])
    trigger = CronTrigger(**fields, timezone=zone, jitter=_optional_seconds(data["jitter"], "jitter"),
                          start_date=_decode_datetime(data["start_date"], "start_date", zone),
                          end_date=_decode_datetime(data["end_date"], "end_date", zone))
    for field in trigger.fields:  # only changes how the trigger is printed
        field.is_default = field.name in defaults
    return trigger


def _expect_keys(data: dict[str, Any], keys: set[str]) -> None:
    if set(data) != keys:
        raise JobStateError(f"a {data.get('type')} trigger has the keys {sorted(keys)}, got {sorted(data)}")


def decode_timezone(name: Any) -> tzinfo:
    """The time zone :func:`encode_timezone` named."""
    if not isinstance(name, str):
        raise JobStateError(f"a time zone is a name, not {name!r}")
    if name == "UTC":
        return timezone.utc
    match = _OFFSET.fullmatch(name)
    if match:
        sign, hours, minutes = match.groups()
        offset = timedelta(hours=int(hours), minutes=int(minutes))
        if offset >= timedelta(hours=24):
            raise JobStateError(f"the UTC offset {name!r} is out of range")
        return timezone(-offset if sign == "-" else offset)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise JobStateError(f"unknown time zone {name!r}: {exc}") from None


def _decode_datetime(value: Any, what: str, zone: tzinfo) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise JobStateError(f"{what} must be an ISO 8601 text, not {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise JobStateError(f"{what} {value!r} is not an ISO 8601 date and time") from None
    if parsed.tzinfo is None:
        raise JobStateError(f"{what} {value!r} has no UTC offset")
    return parsed.astimezone(zone)


def _zone_of(trigger: DateTrigger | IntervalTrigger | CronTrigger) -> tzinfo:
    if isinstance(trigger, DateTrigger):
        zone: tzinfo | None = trigger.run_date.tzinfo
    else:
        zone = trigger.timezone
    return zone if zone is not None else timezone.utc
