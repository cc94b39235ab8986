"""Settings of the test project: three databases, one per server the DJANGO_ORM broker is tested on.

``default`` is a SQLite file (``FUNBOOST_LIKE_TEST_DJANGO_SQLITE``, else one in the temporary folder),
``postgresql`` and ``mariadb`` the test databases of DESIGN §8 (``FUNBOOST_LIKE_TEST_DJANGO_PG_*`` and
``..._MARIADB_*`` override host and port). The broker picks one with the framework setting
``DJANGO_DATABASE_ALIAS``, so the contract suite's variants and their child processes (which get the
settings as environment variables) all use this one settings module.
"""

from __future__ import annotations

import os
import tempfile

try:  # Django's MySQL backend speaks to MySQLdb; PyMySQL stands in for mysqlclient (no C build needed)
    import pymysql

    pymysql.install_as_MySQLdb()
except ImportError:
    pass

SECRET_KEY = "funboost_like tests only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.django_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "funboost_like.contrib.django",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

SQLITE_FILE = (os.environ.get("FUNBOOST_LIKE_TEST_DJANGO_SQLITE")
               or os.path.join(tempfile.gettempdir(),
                               f"funboost_like_django_tests{os.environ.get('PYTEST_XDIST_WORKER', '')}.sqlite3"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": SQLITE_FILE,
        # WAL: readers never wait on the writer; the timeout is SQLite's busy timeout (seconds)
        "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;", "timeout": 20},
    },
    "postgresql": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "test",
        "USER": "postgres",
        "HOST": os.environ.get("FUNBOOST_LIKE_TEST_DJANGO_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("FUNBOOST_LIKE_TEST_DJANGO_PG_PORT", "5432"),
    },
    "mariadb": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": "test",
        "USER": "root",
        "PASSWORD": "",
        "HOST": os.environ.get("FUNBOOST_LIKE_TEST_DJANGO_MARIADB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("FUNBOOST_LIKE_TEST_DJANGO_MARIADB_PORT", "3306"),
        "OPTIONS": {"charset": "utf8mb4"},
    },
}
