"""SecantusDB, the MongoDB stand-in (DESIGN §8), for the tests that need MongoDB on 127.0.0.1:27117.

``.ci/run`` starts it before the tests. On a laptop the session fixture below starts one when a
collected test needs it (the MONGOMQ contract cases, tests/test_mongo.py) and nothing listens on the
port, with its files in a temporary folder, and stops it by its PID at the end of the session. Without
the ``secantusd-py`` program (``pip install secantusdb``) those tests skip, or fail in CI.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from .standin import ServerProcess, listening
except ImportError:  # run as a script (.ci/run): tests/ is the first entry of sys.path
    from standin import ServerProcess, listening  # type: ignore[no-redef]

HOST, PORT = "127.0.0.1", 27117
# No retryable writes: SecantusDB keeps a record of each one, and every later write gets slower (docs/mongo.md).
URL = f"mongodb://{HOST}:{PORT}/funboost_like_test?retryWrites=false"
# What tests leave there: the collections of queues named test_<hex> (and their id counters).
LEFTOVER = re.compile(r"^fl\.(q|dl|kv)\.test_[0-9a-f]{6,}")


def _listening() -> bool:
    return listening(PORT)


def _program() -> str | None:
    beside = Path(sys.executable).with_name("secantusd-py")
    return str(beside) if beside.exists() else shutil.which("secantusd-py")


class SecantusServer(ServerProcess):
    """A ``secantusd-py`` process on 127.0.0.1:``port`` keeping its files in ``folder``."""

    def __init__(self, folder: Path, port: int = PORT) -> None:
        super().__init__("secantusd-py", port)
        self.folder = folder

    def start(self, timeout: float = 30.0) -> None:
        program = _program()
        if program is None:
            raise FileNotFoundError("secantusd-py is not installed (pip install secantusdb)")
        self.launch([program, "--host", HOST, "--port", str(self.port), "--storage-path", str(self.folder / "data"),
                     "--log-level", "WARNING"], self.folder / "secantusd.log", cwd=self.folder, timeout=timeout)


def _needs_mongo(session: pytest.Session) -> bool:
    return any("MONGOMQ" in item.nodeid or "test_mongo.py" in item.nodeid for item in session.items)


def drop_leftovers() -> None:
    """Drop the collections (and counters) that test queues left in the test database."""
    import pymongo

    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(URL, serverSelectionTimeoutMS=3000)
    try:
        db = client.get_default_database()
        names = [name for name in db.list_collection_names() if LEFTOVER.match(name)]
        for name in names:
            db.drop_collection(name)
        db["fl.sequences"].delete_many({"_id": {"$regex": r"^fl\.q\.test_[0-9a-f]{6,}"}})
    except pymongo.errors.PyMongoError:
        pass  # a server that went away: nothing to tidy there
    finally:
        client.close()


@pytest.fixture(autouse=True, scope="session")
def _mongo_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start SecantusDB for this session when a collected test needs it and none is running; at the
    end stop it, or (on a server this session did not start) drop what the test queues left."""
    needed = _needs_mongo(request.session)
    server = None
    if needed and not _listening() and _program() is not None:
        server = SecantusServer(Path(tempfile.mkdtemp(prefix="secantusdb-")))
        try:
            server.start()
        except RuntimeError as exc:  # the tests that need it skip, or fail in CI, saying it is unreachable
            warnings.warn(str(exc), stacklevel=1)
    try:
        yield
    finally:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            pass  # other workers may still use it: left running, tidied by the controller (tests/conftest.py)
        elif server is not None:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)
        elif needed and not os.environ.get("FUNBOOST_LIKE_TEST_KEEP_LEFTOVERS") and _listening():
            drop_leftovers()
