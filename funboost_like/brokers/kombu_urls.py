"""kombu URLs: which transport a URL names, and the transport options given in its query."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kombu.transport import get_transport_cls


def transport_name(url: str) -> str:
    """``redis``, ``memory``, ``sqla+sqlite``, ``sqla`` (other databases), ``amqp``, ...: what decides the class."""
    scheme = url.partition("://")[0].strip().lower() if "://" in url else ""
    name, _, dialect = scheme.partition("+")
    if name in ("sqla", "sqlalchemy"):
        return "sqla+sqlite" if dialect.startswith("sqlite") else "sqla"
    return name


def split_options(url: str) -> tuple[str, dict[str, Any]]:
    """``url`` without the query parameters that are options of its kombu transport, and those options."""
    options: dict[str, Any] = {}
    parts = []
    for part in url.split(";"):
        split = urlsplit(part.strip())
        if not split.query:
            parts.append(part.strip())
            continue
        transport: Any = get_transport_cls(transport_name(part).partition("+")[0])
        known = transport.Channel.from_transport_options
        rest = []
        for key, value in parse_qsl(split.query, keep_blank_values=True):
            if key in known:
                options[key] = _option_value(value)
            else:
                rest.append((key, value))
        parts.append(urlunsplit(split._replace(query=urlencode(rest))))
    return ";".join(parts), options


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)  # numbers, true/false, lists such as priority_steps
    except ValueError:
        return text
