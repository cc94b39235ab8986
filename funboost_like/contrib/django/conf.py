"""Setting Django up for the DJANGO_ORM broker, the database it uses, and its tables.

Nothing here runs at import. :func:`ensure_django` sets Django up in a process that has not (a
consumer script, a child process started with ``spawn``), from the framework setting
``DJANGO_SETTINGS_MODULE`` when given, else from the environment variable of that name. The
database is the framework setting ``DJANGO_DATABASE_ALIAS``, else the Django setting
``FUNBOOST_LIKE_DATABASE``, else ``"default"``.
"""

from __future__ import annotations

import os
import threading

from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError

APP = "funboost_like.contrib.django"
APP_LABEL = "funboost_like_django"
MESSAGE_TABLE = "funboost_like_message"
_setup_lock = threading.Lock()


def ensure_django() -> None:
    """``django.setup()`` unless the apps are loaded; ConfigurationError when nothing says how, or when
    the app is not in INSTALLED_APPS."""
    from django.apps import apps

    if not apps.ready:
        _setup()
    if not apps.is_installed(APP):
        raise ConfigurationError(f"add {APP!r} to INSTALLED_APPS and run: python manage.py migrate")


def _setup() -> None:
    import django
    from django.apps import apps
    from django.conf import settings as django_settings

    with _setup_lock:
        if apps.ready:
            return
        if not django_settings.configured:
            module = str(settings.get("DJANGO_SETTINGS_MODULE") or "")
            if module:
                os.environ["DJANGO_SETTINGS_MODULE"] = module  # what manage.py does
            elif not os.environ.get("DJANGO_SETTINGS_MODULE"):
                raise ConfigurationError(
                    "the DJANGO_ORM broker needs Django set up: call django.setup() first, or set the "
                    "DJANGO_SETTINGS_MODULE environment variable or framework setting (e.g. 'mysite.settings')")
        django.setup()


def database_alias() -> str:
    """The database alias of the queue tables (Django must be set up)."""
    from django.conf import settings as django_settings
    from django.db import connections

    alias = str(settings.get("DJANGO_DATABASE_ALIAS") or getattr(django_settings, "FUNBOOST_LIKE_DATABASE", "")
                or "default")
    if alias not in connections.settings:
        raise ConfigurationError(f"the DJANGO_ORM database alias {alias!r} is not in DATABASES "
                                 f"(known: {', '.join(connections.settings)})")
    return alias


def ensure_tables(alias: str) -> None:
    """Check that the app's migrations made its tables on ``alias``; with DJANGO_MIGRATE_ON_FIRST_USE,
    apply them when missing. Runs a query: call it where Django allows synchronous ORM calls."""
    from django.db import connections

    if MESSAGE_TABLE in connections[alias].introspection.table_names():
        return
    if not settings.get("DJANGO_MIGRATE_ON_FIRST_USE"):
        flag = "" if alias == "default" else f" --database {alias}"
        raise ConfigurationError(f"the tables of {APP} are missing on database {alias!r}; run: "
                                 f"python manage.py migrate{flag} (or set DJANGO_MIGRATE_ON_FIRST_USE=True)")
    from django.core.management import call_command

    try:
        call_command("migrate", APP_LABEL, database=alias, verbosity=0, interactive=False)
    except Exception:
        if MESSAGE_TABLE not in connections[alias].introspection.table_names():
            raise  # not another process migrating at the same moment


_inherited: list[object] = []  # a forked child's copies of its parent's connections: kept, never used or closed


def forget_inherited_connections() -> None:
    """In a forked child: drop the Django connections copied from the parent without closing them (a
    close would end the parent's sessions); the next query opens the child's own."""
    from django.apps import apps

    if not apps.ready:
        return
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        _inherited.append(wrapper)
        del connections[wrapper.alias]
