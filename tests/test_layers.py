"""The layers read top-down: what each module of ``core/`` imports, measured in a fresh interpreter.

``funboost_like/__init__.py`` re-exports the whole public API (so importing any submodule the usual
way loads the engine, and with it the broker registry). To measure a module's *own* imports, each
subprocess stands an empty package in for ``funboost_like`` before importing the module.

* The foundation of ``core/`` (everything but the engine below) imports nothing from
  ``funboost_like.brokers`` nor ``funboost_like.middleware``.
* The engine (``booster``, ``consumer``, ``publisher``) drives the broker contract through the
  registry and runs the feature table: it imports ``brokers.base`` (with its ``brokers.maintenance``),
  ``brokers.registry`` and ``middleware.base``, never a concrete broker nor a feature module (the
  registry and the feature table load those lazily).
* The process supervisor imports neither the booster nor the consumer: it runs an opaque target.

The foundation is also read statically: not even an import inside a function (run time) reaches
up, only type annotations under ``if TYPE_CHECKING:`` may name the broker contract.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import funboost_like.core

PACKAGE_DIR = str(Path(funboost_like.core.__file__).resolve().parent.parent)
CORE_MODULES = sorted(m.name for m in pkgutil.iter_modules(funboost_like.core.__path__))
ENGINE = {"booster", "consumer", "publisher"}
ENGINE_MAY_IMPORT = {  # the broker contract (the base, its maintenance thread, routing words) and the registry
    "funboost_like.brokers", "funboost_like.brokers.base", "funboost_like.brokers.capabilities",
    "funboost_like.brokers.dead_letters", "funboost_like.brokers.optional",
    "funboost_like.brokers.maintenance",
    "funboost_like.brokers.routing", "funboost_like.brokers.registry",
    "funboost_like.middleware", "funboost_like.middleware.base",
}

_PROBE = """
import importlib, json, sys, types
package = types.ModuleType("funboost_like")
package.__path__ = [sys.argv[1]]
sys.modules["funboost_like"] = package
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(name for name in sys.modules if name.startswith("funboost_like."))))
"""


def imported_by(module: str) -> set[str]:
    """The ``funboost_like.*`` modules a fresh interpreter holds after importing ``module``."""
    done = subprocess.run([sys.executable, "-c", _PROBE, PACKAGE_DIR, module], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def test_the_core_modules_are_all_listed() -> None:
    assert ENGINE <= set(CORE_MODULES) and {"calls", "params", "stores", "status_store"} <= set(CORE_MODULES)


@pytest.mark.parametrize("name", [m for m in CORE_MODULES if m not in ENGINE])
def test_the_foundation_of_core_imports_no_broker_and_no_feature(name: str) -> None:
    loaded = imported_by(f"funboost_like.core.{name}")
    upward = sorted(m for m in loaded if m.startswith(("funboost_like.brokers", "funboost_like.middleware")))
    assert upward == [], f"funboost_like.core.{name} imports {upward}"


def upward_imports(path: Path) -> list[str]:
    """``import`` statements of ``path`` that name brokers or middleware, outside ``if TYPE_CHECKING:``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:  # "from funboost_like import brokers" too
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.extend(f"line {getattr(node, 'lineno', '?')}: {name}" for name in names
                     if name.startswith(("funboost_like.brokers", "funboost_like.middleware")))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


@pytest.mark.parametrize("name", [m for m in CORE_MODULES if m not in ENGINE])
def test_the_foundation_of_core_never_imports_brokers_or_features_even_at_run_time(name: str) -> None:
    path = Path(PACKAGE_DIR) / "core" / f"{name}.py"
    assert upward_imports(path) == []


@pytest.mark.parametrize("name", sorted(ENGINE))
def test_the_engine_imports_the_broker_contract_and_the_feature_table_only(name: str) -> None:
    loaded = imported_by(f"funboost_like.core.{name}")
    upward = sorted(m for m in loaded if m.startswith(("funboost_like.brokers", "funboost_like.middleware"))
                    and m not in ENGINE_MAY_IMPORT)
    assert upward == [], f"funboost_like.core.{name} imports {upward}"


def test_the_process_supervisor_knows_no_booster() -> None:
    loaded = imported_by("funboost_like.concurrency.multiprocess")
    assert not {"funboost_like.core.booster", "funboost_like.core.consumer"} & loaded
    assert not [m for m in loaded if m.startswith(("funboost_like.brokers", "funboost_like.middleware"))]
