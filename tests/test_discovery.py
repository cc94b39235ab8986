"""Seed 002's names: task discovery (``discover_and_mount_ts``), a package's decorated functions by queue
name, and its decorator ``task_function``."""

from __future__ import annotations

import queue
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like import (
    Booster,
    ConfigurationError,
    PriorityConsumingControlConfig,
    autodiscover,
    discover_and_mount_ts,
    task_function,
)


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An importable package with a unique name (app_<hex>/engine/...)."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    (root / "engine" / "more").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "engine" / "__init__.py").write_text("from .test import test\n__all__ = ['test']\n")
    (root / "engine" / "more" / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    yield name, root
    sys.path.remove(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def write(path: Path, code: str) -> None:
    path.write_text(textwrap.dedent(code))


def test_every_module_and_subpackage_is_imported_and_its_functions_returned(package: tuple[str, Path]) -> None:
    name, root = package
    write(root / "engine" / "test.py", f"""
        from funboost_like import BrokerEnum, task_deco

        @task_deco("{name}_test", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
        def test(message):
            return "test"

        @task_deco("{name}_test1", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
        def test1(message):
            return "test1"
    """)
    write(root / "engine" / "more" / "deep.py", f"""
        from funboost_like import BrokerEnum, task_deco

        @task_deco("{name}_deep", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
        def deep(x):
            return x
    """)
    tasks = discover_and_mount_ts(f"{name}.engine")
    assert tasks.get_all_task_names() == [f"{name}_deep", f"{name}_test", f"{name}_test1"]
    assert all(isinstance(b, Booster) for b in tasks.values())
    assert tasks[f"{name}_test1"]("m") == "test1"
    assert autodiscover(f"{name}.engine") == tasks  # again: the same functions, imported once


def test_two_functions_on_one_queue_are_refused(package: tuple[str, Path]) -> None:
    name, root = package
    (root / "engine" / "__init__.py").write_text("")
    for module in ("a", "b"):
        write(root / "engine" / f"{module}.py", f"""
            from funboost_like import BrokerEnum, task_deco

            @task_deco("{name}_same", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
            def f_{module}(x):
                return x
        """)
    with pytest.raises(ConfigurationError, match="two functions consume queue"):
        autodiscover(f"{name}.engine")


def test_an_import_error_names_its_module(package: tuple[str, Path]) -> None:
    name, root = package
    (root / "engine" / "__init__.py").write_text("")
    (root / "engine" / "broken.py").write_text("import not_a_module_anywhere_123\n")
    with pytest.raises(ImportError, match="not_a_module_anywhere_123"):
        autodiscover(f"{name}.engine")


def test_seed_002s_task_function_names_the_queue_after_the_function(package: tuple[str, Path]) -> None:
    """Seed 002 decorates with ``@task_function(use_cache=True)`` and sends to a task by its function's
    name; the migration table of docs/cache-and-discovery.md, run."""
    name, root = package
    (root / "engine" / "__init__.py").write_text("")
    write(root / "engine" / "test.py", f"""
        from funboost_like import BrokerEnum, task_function

        @task_function(use_cache=True, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=5)
        def {name}_test(message):
            return f"test {{type(message).__name__}}"

        @task_function(broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
        def {name}_test1(message):
            return "test1"
    """)
    tasks = discover_and_mount_ts(f"{name}.engine")
    assert tasks.get_all_task_names() == [f"{name}_test", f"{name}_test1"]
    test = tasks[f"{name}_test"]
    assert test.params.use_cache and test.params.concurrent_num == 5
    results: queue.Queue[dict[str, object]] = queue.Queue()
    test.consume()
    try:
        # send_message('test', {'message': lock}, callback, 1, True): a lock cannot be JSON, cache mode passes it
        test.publish({"message": threading.Lock()},
                     PriorityConsumingControlConfig(priority=1, is_using_rpc_mode=True)).set_callback(results.put)
        record = results.get(timeout=10)
    finally:
        test.stop()
    assert record["status"] == "finished" and record["result"] == "test lock", record

    @task_function
    def bare(x: int) -> int:
        return x

    @task_function(queue_name=f"{name}_named", broker_kind=3)
    def named(x: int) -> int:
        return x

    assert isinstance(bare, Booster) and bare.queue_name == "bare" and bare(2) == 2
    assert named.queue_name == f"{name}_named"
    with pytest.raises(ValueError):
        task_function(not_a_parameter=1)(lambda: None)  # type: ignore[call-overload]
