"""The ``TIMEZONE`` setting: how naive datetimes and wall-clock times of day are read.

``TIMEZONE`` is an IANA zone name (``"Asia/Shanghai"``, ``"Europe/Paris"``); empty (the default)
means the machine's local time. It applies to a naive ``eta`` given at publish time and to the
``do_not_run_by_specify_time`` window. An aware datetime always keeps its own offset.
"""

from __future__ import annotations

import datetime
import zoneinfo

from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError


def configured_zone() -> zoneinfo.ZoneInfo | None:
    """The zone of the ``TIMEZONE`` setting, or None for the machine's local time.

    Raises :class:`ConfigurationError` for a name the time zone database does not know.
    """
    name = str(settings.get("TIMEZONE") or "").strip()
    if not name:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"TIMEZONE={name!r} is not a time zone this machine knows (an IANA name such as 'Asia/Shanghai'; "
            "on Windows install the tzdata package)"
        ) from exc


def timestamp(moment: datetime.datetime) -> float:
    """The UNIX time of ``moment``; a naive datetime is read in the ``TIMEZONE`` setting."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        zone = configured_zone()
        if zone is not None:
            moment = moment.replace(tzinfo=zone)
    return moment.timestamp()  # still naive: the machine's local time

