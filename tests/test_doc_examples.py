"""The docs name only things that exist: README.md and docs/*.md are checked against the code.

- every ```python block compiles (a block marked ``<!-- fragment -->`` on the line before it is
  exempt: keep such marks rare);
- every block imports the funboost_like names it uses (``task_deco``, ``BrokerEnum``, ...);
- every ``from funboost_like... import X``, ``import funboost_like.x`` and ``funboost_like.x.y`` (in a
  block or in a prose code span) names a module or attribute that imports;
- every setting the docs present (``REDIS_URL``, ``FUNBOOST_LIKE_REDIS_URL``, ``patch_frame_config(X=...)``,
  ``X = ...`` in a ``distributed_frame_config.py`` block) is in the settings registry, and every keyword of
  ``task_deco``/``boost``/``get_consumer``/``task_function``/``PriorityConsumingControlConfig`` in an
  example is an accepted parameter;
- every ``funboost_like <command>`` / ``python -m funboost_like <command>`` line names a real command and
  real options of the CLI's own parser;
- what the docs call on a decorated function (``fn.push``, ``fn.consumer.estimate``, ``fn.broker.join``),
  ``BrokerEnum.X`` and ``ConcurrentModeEnum.X``, and every ``python benchmarks/x.py --option`` exist;
- every settings table gives the registry's default, and docs/configuration.md lists every setting;
- every file the prose names (``funboost_like/brokers/redis_common.py``, ``brokers/redis_list.py``,
  ``python -m test_frame.test_rpc.test_consume``) exists, and every link reaches a page and a heading.

Each check collects every problem with its file and line, so one run lists them all. Nothing here
starts a broker: the whole file runs in about a second.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib
import re
import shlex
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from funboost_like import cli, task_deco
from funboost_like.core import config, params
from funboost_like.core.enums import BrokerEnum, ConcurrentModeEnum

from .conftest import REPO

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FRAGMENT_MARK = "<!-- fragment -->"

# Functions whose keyword arguments are decorator parameters (ConsumerParams or an alias).
PARAM_TAKERS = {"task_deco", "boost", "get_consumer", "task_function"}

# Capitalised names that look like settings (a settings family's prefix, or a setting-like suffix) but
# are something else; each says what it is.
NOT_SETTINGS = {
    "HTTPSQS_GET_END", "HTTPSQS_PUT_END", "HTTPSQS_PUT_OK", "HTTPSQS_AUTH_FAILED",  # httpsqs answers
    "DJANGO_ALLOW_ASYNC_UNSAFE",  # Django's environment variable
    "ROCKETMQ_ENDPOINTS",  # the planned setting of the RocketMQ kind, which is not built (docs/rocketmq.md)
    "PSYCOPG_WAIT_FUNC",  # psycopg's
    "PROMETHEUS_MULTIPROC_DIR",  # prometheus-client's
}
SETTING_SUFFIXES = ("_SECONDS", "_URL", "_PATH", "_DIR", "_PORT", "_HOST", "_ADDRESSES")
# Pages whose capitalised names are mostly other frameworks' (measurements beside funboost's settings).
SETTINGS_EXEMPT_PAGES = {"performance.md"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str
    fragment: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclass
class Span:
    path: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def block_code(body: list[str]) -> str:
    """A block's code: dedented (a block inside a list item is indented), and only the input of a
    ``>>>`` session."""
    code = textwrap.dedent("\n".join(body))
    if code.lstrip().startswith(">>> "):
        code = "\n".join(line[4:] for line in code.splitlines() if line.startswith((">>> ", "... ")))
    return code + "\n"


def parse_markdown(path: Path) -> tuple[list[Block], list[Span]]:
    """The fenced blocks of a page, and the inline code spans of its prose (spans may wrap a line)."""
    blocks: list[Block] = []
    prose: list[str] = []  # the page with every fenced line blanked, so offsets keep their line numbers
    lines = path.read_text(encoding="utf-8").splitlines()
    fence: tuple[int, str, list[str]] | None = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = (number, stripped[3:].strip(), [])
            prose.append("")
        elif fence is not None and stripped == "```":
            start, lang, body = fence
            before = lines[start - 2].strip() if start >= 2 else ""
            blocks.append(Block(path, start, lang, block_code(body), before == FRAGMENT_MARK))
            fence = None
            prose.append("")
        elif fence is not None:
            fence[2].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{path.relative_to(REPO)}:{fence[0]}: unclosed ``` fence"
    text = "\n".join(prose)
    spans = [Span(path, text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
             for m in re.finditer(r"`([^`]+)`", text)]
    return blocks, spans


PAGES = {path: parse_markdown(path) for path in DOC_FILES}


def all_blocks(lang: str | None = None) -> Iterator[Block]:
    for blocks, _ in PAGES.values():
        yield from (b for b in blocks if lang is None or b.lang == lang)


def all_spans() -> Iterator[Span]:
    for _, spans in PAGES.values():
        yield from spans


def python_trees() -> Iterator[tuple[Block, ast.Module]]:
    for block in all_blocks("python"):
        if not block.fragment:
            try:
                yield block, ast.parse(block.text)
            except SyntaxError:
                continue  # reported by test_python_blocks_compile


def report(problems: list[str]) -> None:
    assert not problems, "the docs disagree with the code:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------- compile


def test_python_blocks_compile() -> None:
    problems = []
    for block in all_blocks("python"):
        if block.fragment:
            continue
        try:
            compile(block.text, block.where, "exec")
        except SyntaxError as exc:
            problems.append(f"{block.where}: block line {exc.lineno}: {exc.msg}")
    report(problems)


def test_fragment_marks_stay_rare() -> None:
    marked = [b.where for b in all_blocks() if b.fragment]
    assert len(marked) <= 5, f"too many blocks marked {FRAGMENT_MARK}: {marked}"


# ------------------------------------------------------------------------------------- funboost_like names


def name_problem(dotted: str) -> str | None:
    """None if ``funboost_like.a.b.c`` imports (the longest importable module, then attributes), else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name + ".") and exc.name != module_name:
                return f"importing {module_name} needs {exc.name!r}, not installed"  # a real dependency problem
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:parts.index(attr)])} has no {attr!r}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


def referenced_names() -> Iterator[tuple[str, str]]:
    """(where, dotted name) for every funboost_like name the docs use."""
    for block, tree in python_trees():
        for node in ast.walk(tree):
            for dotted in node_names(node):
                if dotted.split(".")[0] == "funboost_like":
                    yield f"{block.where}+{getattr(node, 'lineno', 0)}", dotted
    for span in all_spans():
        yield from ((span.where, dotted) for dotted in span_names(span.text))


def node_names(node: ast.AST) -> list[str]:
    """The dotted names an import or an attribute chain of a block uses."""
    if isinstance(node, ast.ImportFrom) and node.module:
        return [f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*"]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Attribute):
        chain = dotted_name(node)
        return [chain] if chain else []
    return []


def span_names(text: str) -> list[str]:
    """`from funboost_like.x import A, B`, `funboost_like.x.y`, `funboost_like.x.y(...)`, `funboost_like.x:Name`.
    Names of other things (the Kafka group `funboost_like.q`, the span attribute `funboost_like.outcome`, the
    logger `funboost_like.kafka.librdkafka`) start with no module of the package and are left alone."""
    match = re.fullmatch(r"from (funboost_like[\w.]*) import ([\w, ]+)", text)
    if match:
        return [f"{match.group(1)}.{name.strip()}" for name in match.group(2).split(",")]
    names = []
    for match in re.finditer(r"(?<![\w/<])(funboost_like(?:\.\w+)+)(?::(\w+))?(?![\w<>/])", text):
        dotted = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
        if dotted.split(".")[1] in PACKAGE_NAMES and ".my_" not in dotted:  # `my_module`: an example's
            names.append(dotted)
    return names


PACKAGE_NAMES = {p.stem for p in (REPO / "funboost_like").iterdir()
                 if p.suffix == ".py" or (p / "__init__.py").exists()}
PACKAGE_NAMES |= set(importlib.import_module("funboost_like").__all__)


def dotted_name(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def test_funboost_like_names_exist() -> None:
    problems = []
    seen: dict[str, str | None] = {}
    for where, dotted in referenced_names():
        if dotted not in seen:
            seen[dotted] = name_problem(dotted)
        if seen[dotted]:
            problems.append(f"{where}: {dotted}: {seen[dotted]}")
    report(problems)


PUBLIC_NAMES = set(importlib.import_module("funboost_like").__all__) | {
    "fsdf_background_scheduler", "timing_publish_deco", "FsdfBackgroundScheduler"}


def unimported_public_names(tree: ast.Module) -> list[str]:
    """funboost_like's public names a block uses without binding them (an import, a def, an assignment)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return sorted((used & PUBLIC_NAMES) - bound)


def test_blocks_import_the_names_they_use() -> None:
    """A block that decorates with `task_deco` imports it (pipelines.md and time-windows.md did not)."""
    report([f"{block.where}: uses {', '.join(names)} without importing it"
            for block, tree in python_trees() if (names := unimported_public_names(tree))])


# Folders a path in prose may start from: the repository's, and the package's (`brokers/redis_list.py`).
PATH_ROOTS = {p.name: p.parent for p in [*REPO.iterdir(), *(REPO / "funboost_like").iterdir()]
              if p.is_dir() and not p.name.startswith(".")}


def path_problems(text: str) -> list[str]:
    """Files named in a span (`funboost_like/brokers/redis_common.py`, `brokers/redis_list.py`,
    `python -m test_frame.test_rpc.test_consume`) that are not there."""
    problems = []
    for match in re.finditer(r"(?<![\w/.<])((\w+)/[\w/.+-]*\.(?:py|md|sh|txt|json|toml))\b", text):
        path, root = match.group(1), match.group(2)
        if root in PATH_ROOTS and not (PATH_ROOTS[root] / path).exists():
            problems.append(f"{path}: no such file")
    for match in re.finditer(r"python3? -m ((?:test_frame|benchmarks|tests|scripts)(?:\.\w+)+)", text):
        module = REPO / match.group(1).replace(".", "/")
        if not module.with_suffix(".py").exists() and not (module / "__main__.py").exists():
            problems.append(f"{match.group(1)}: no such module")
    return problems


def test_source_paths_exist() -> None:
    """The files the prose names are in the repository (a file has an extension: `funboost_like/kv/q` is
    an MQTT topic, and `mysite/settings.py` is the reader's)."""
    report([f"{span.where}: {problem}" for span in all_spans() for problem in path_problems(span.text)])


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in parse_markdown_prose(path):
        if line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def parse_markdown_prose(path: Path) -> list[str]:
    """The page's lines, those of fenced blocks (and the fences) blanked: line numbers stay right."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def test_links_reach_pages_and_headings() -> None:
    """`[performance](performance.md#kafka-on-the-stand-ins)` and `[below](#settings)` name a page and a heading."""
    problems = []
    for path in DOC_FILES:
        text = "\n".join(parse_markdown_prose(path))
        for match in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = match.group(1)
            if re.match(r"\w+:", target):
                continue  # http:, mailto:
            file, _, anchor = target.partition("#")
            page = (path.parent / file).resolve() if file else path
            if not page.exists():
                problems.append(f"{path.relative_to(REPO)}: link {target}: no such file")
            elif anchor and page.suffix == ".md" and anchor not in anchors(page):
                problems.append(f"{path.relative_to(REPO)}: link {target}: no such heading")
    report(problems)


# --------------------------------------------------------------------------------------- settings, params


SETTINGS = set(config.DEFAULTS) | set(config.ALIASES)
ENUM_NAMES = set(BrokerEnum.__members__) | set(ConcurrentModeEnum.__members__)
FAMILIES = {name.split("_")[0] for name in config.DEFAULTS if "_" in name} - {"LOG"}  # LOG_ is too common a word


def source_env_names() -> set[str]:
    """FUNBOOST_LIKE_* environment variables the code, tests or benchmarks read besides the settings."""
    names: set[str] = set()
    for folder in ("funboost_like", "tests", "benchmarks", "scripts"):
        for file in (REPO / folder).rglob("*.py"):
            if file.name != "test_doc_examples.py":
                names.update(re.findall(r"FUNBOOST_LIKE_[A-Z0-9_]+", file.read_text(encoding="utf-8")))
    names.update(f"FUNBOOST_LIKE_{prefix}" for prefix in ("TEST_", "BENCH_"))
    return names


def looks_like_setting(name: str) -> bool:
    if name in SETTINGS:
        return True
    if name in ENUM_NAMES or name in NOT_SETTINGS or "_" not in name:
        return False
    return name.split("_")[0] in FAMILIES or name.endswith(SETTING_SUFFIXES)


def presented_settings() -> Iterator[tuple[str, str]]:
    """(where, name) for every setting name the docs present."""
    env_names = source_env_names()
    for span in all_spans():
        if span.path.name not in SETTINGS_EXEMPT_PAGES:
            yield from ((span.where, name) for name in span_settings(span.text, env_names))
    for block, tree in python_trees():
        config_file = "distributed_frame_config" in block.text
        for node in ast.walk(tree):
            yield from ((f"{block.where}+{node.lineno}", name) for name in node_settings(node, config_file))
    for block in all_blocks():
        if block.lang != "python":  # shell lines: FUNBOOST_LIKE_X=... command
            for match in re.finditer(r"(?<![\w$])FUNBOOST_LIKE_([A-Z0-9_]+)=", block.text):
                if "FUNBOOST_LIKE_" + match.group(1) not in env_names:
                    yield block.where, match.group(1)


def span_settings(text: str, env_names: set[str]) -> list[str]:
    """`FUNBOOST_LIKE_X` (not a variable the code reads besides the settings), and a span that is only a
    setting-like name, or `NAME = value`."""
    names = []
    for match in re.finditer(r"(?<![\w$])(FUNBOOST_LIKE_)?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)\b", text):
        prefixed, name = match.group(1), match.group(2)
        if prefixed:
            full = prefixed + name
            if name not in NOT_SETTINGS and full not in env_names and not any(
                    full.startswith(p) for p in env_names if p.endswith("_")):
                names.append(name)
        elif looks_like_setting(name) and re.fullmatch(r"[A-Z0-9_]+(\s*=.*)?", text):
            names.append(name)
    return names


def node_settings(node: ast.AST, config_file: bool) -> list[str]:
    """Keywords of `patch_frame_config(...)`; in a `distributed_frame_config.py` block, its top-level NAME = ..."""
    if isinstance(node, ast.Call) and call_name(node) == "patch_frame_config":
        return [keyword.arg for keyword in node.keywords if keyword.arg is not None]
    if config_file and isinstance(node, ast.Assign) and node.col_offset == 0:
        return [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper() and t.id != "DATABASES"]
    return []


def test_enum_members_exist() -> None:
    """`BrokerEnum.X` and `ConcurrentModeEnum.X`, in blocks and prose (`MY_KIND` is writing-a-broker's example)."""
    enums = {"BrokerEnum": BrokerEnum, "ConcurrentModeEnum": ConcurrentModeEnum}
    problems = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"\b(BrokerEnum|ConcurrentModeEnum)\.(\w+)", line):
                enum, member = match.groups()
                if member not in enums[enum].__members__ and not member.startswith("MY_"):
                    problems.append(f"{path.relative_to(REPO)}:{number}: {enum} has no {member}")
    report(problems)


def booster_chains() -> Iterator[tuple[str, list[str]]]:
    """(where, attribute chain) for every use of a decorated function: `add.push`, `fn.consumer.estimate`, in
    the blocks (names a block decorates with task_deco, boost or task_function) and in prose (`fn.`)."""
    for block, tree in python_trees():
        boosters = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and any(call_name(d) in PARAM_TAKERS if isinstance(d, ast.Call) else
                            isinstance(d, ast.Name) and d.id in PARAM_TAKERS for d in node.decorator_list)}
        boosters.add("fn")  # the docs' name for any decorated function
        for node in ast.walk(tree):
            chain = dotted_name(node) if isinstance(node, ast.Attribute) else None
            if chain and chain.split(".")[0] in boosters:
                yield f"{block.where}+{node.lineno}", chain.split(".")[1:]
    for span in all_spans():
        for match in re.finditer(r"(?<![\w.])fn((?:\.\w+)+)", span.text):
            yield span.where, match.group(1).split(".")[1:]


@functools.cache
def probe_booster() -> object:
    @task_deco("doc_examples_probe", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def probe(x: int) -> int:
        return x

    return probe


def booster_problem(chain: list[str]) -> str | None:
    """Why `fn.<chain>` does not exist (its `consumer` and `broker` looked into: the memory broker's), or None."""
    obj = probe_booster()
    for depth, attr in enumerate(chain[:2]):
        if not hasattr(obj, attr):
            return f"{'.'.join(['fn', *chain[:depth]])} has no {attr!r}"
        obj = getattr(obj, attr)
        if attr not in ("consumer", "broker"):
            break
    return None


def test_booster_attributes_exist() -> None:
    """What the docs call on a decorated function, its consumer and its broker exists."""
    report([f"{where}: {problem}" for where, chain in booster_chains() if (problem := booster_problem(chain))])


def test_settings_exist() -> None:
    problems = []
    for where, name in presented_settings():
        if name not in SETTINGS:
            guess = difflib.get_close_matches(name, sorted(SETTINGS), n=1)
            problems.append(f"{where}: {name} is not a setting" + (f" (did you mean {guess[0]}?)" if guess else ""))
    report(problems)


def default_problem(name: str, text: str) -> str | None:
    """Why a settings table's default cell (`15`, `` `15.0` ``, `` `""` (the RabbitMQ URL) ``, `True`, "per-user
    data folder ...") is not the registry's default of ``name``, or None."""
    default = config.DEFAULTS[config.ALIASES.get(name, name)]
    text = re.sub(r"\s*\(.*\)$", "", text.strip())
    if not text or text.startswith(("per-user data folder", "empty:")) and default == "":
        return None
    value = text.replace("`", "")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if isinstance(default, bool):
        same = value == str(default)
    elif isinstance(default, (int, float)):
        try:
            same = float(value.replace(",", "")) == default
        except ValueError:
            same = False
    else:
        same = value == default
    return None if same else f"the default of {name} is {default!r}, not {text}"


def settings_table_rows() -> Iterator[tuple[str, str, str]]:
    """(where, setting, default cell) for every row of a table whose first column is `setting` and that
    has a `default` column; a row naming several settings gives their defaults comma-separated."""
    for path in DOC_FILES:
        header: list[str] | None = None
        for number, line in enumerate(parse_markdown_prose(path), 1):
            if not line.startswith("|"):
                header = None
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = [cell.lower() for cell in cells]
                continue
            if "setting" not in header[0] or "default" not in header or set(cells[0]) <= set("-: "):
                continue
            names = [n for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]) if n in SETTINGS]
            cell = cells[header.index("default")]
            values = [cell] if len(names) == 1 else re.split(r",\s*", cell)
            for name, value in zip(names, values if len(values) == len(names) else [cell] * len(names), strict=True):
                yield f"{path.relative_to(REPO)}:{number}", name, value


def test_settings_tables_give_the_registry_defaults() -> None:
    rows = list(settings_table_rows())
    assert len(rows) > 80, "the settings tables were not found: the parser of this test broke"
    report([f"{where}: {problem}" for where, name, text in rows if (problem := default_problem(name, text))])
    listed = {name for where, name, _ in rows if where.startswith("docs/configuration.md")}
    missing = sorted(set(config.DEFAULTS) - listed)
    assert not missing, f"settings missing from the table of docs/configuration.md: {missing}"


def call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


ACCEPTED_PARAMS = (params.PARAM_NAMES | set(params.ALIASES)) - {"consuming_function"}
OPTIONS_CLASS = "PriorityConsumingControlConfig"
ACCEPTED_OPTIONS = {f.name for f in dataclasses.fields(params.PriorityConsumingControlConfig)}


def checked_calls() -> Iterator[tuple[str, str, ast.Call]]:
    """(where, what is called, the call) for the decorators and PriorityConsumingControlConfig (also
    under the name a block imports it as) in the blocks and in prose spans such as `@task_deco("q", qps=5)`."""
    for block, tree in python_trees():
        options = {OPTIONS_CLASS} | {alias.asname for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                                     for alias in node.names if alias.name == OPTIONS_CLASS and alias.asname}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node) in PARAM_TAKERS | options:
                name = call_name(node)
                yield f"{block.where}+{node.lineno}", OPTIONS_CLASS if name in options else str(name), node
    for span in all_spans():
        text = span.text.lstrip("@")
        if re.match(rf"(task_deco|boost|get_consumer|task_function|{OPTIONS_CLASS})\(.*\)$", text):
            try:
                node = ast.parse(text, mode="eval").body
            except SyntaxError:
                continue  # `task_deco(..., qps=...)`-style shorthand
            if isinstance(node, ast.Call) and call_name(node) in PARAM_TAKERS | {OPTIONS_CLASS}:
                yield span.where, str(call_name(node)), node


def test_call_keywords_are_parameters() -> None:
    problems = []
    for where, taker, call in checked_calls():
        accepted = ACCEPTED_OPTIONS if taker == OPTIONS_CLASS else ACCEPTED_PARAMS
        if taker == "get_consumer":
            accepted = accepted | {"consuming_function"}
        elif taker == "task_function":
            accepted = accepted | {"queue_name"}
        for keyword in call.keywords:
            if keyword.arg is not None and keyword.arg not in accepted:
                problems.append(f"{where}: {taker}(..., {keyword.arg}=...): not a parameter")
    report(problems)


# ---------------------------------------------------------------------------------------------------- CLI


def cli_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = cli._build_parser()
    commands: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    return parser, commands


def cli_lines() -> Iterator[tuple[str, str, bool]]:
    """(where, the words after `funboost_like`, complete) for every command line of the docs; a shell
    line of a block is complete (it must parse), a prose span may leave out a positional argument."""
    lead = r"(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3? -m funboost_like|funboost_like)"
    for block in all_blocks():
        if block.lang in ("", "text", "bash", "sh", "console"):
            for offset, line in enumerate(block.text.splitlines(), 1):
                prompt = r"\$\s+" if block.lang in ("", "text") else r"(?:\$\s+)?"  # else: the output
                match = re.match(rf"\s*{prompt}{lead}(\s.*)?$", line)
                if match:
                    yield f"{block.where}+{offset}", (match.group(1) or "").strip(), True
    for span in all_spans():
        match = re.fullmatch(rf"{lead}(\s.*)?", span.text)
        if match:
            yield span.where, (match.group(1) or "").strip(), False


def cli_problem(words: str, complete: bool) -> str | None:
    parser, commands = cli_parsers()
    try:
        argv = shlex.split(words, comments=True)
    except ValueError as exc:
        return f"cannot split: {exc}"
    if not argv:
        return None
    if argv[0].startswith("-"):
        known = {s for a in parser._actions for s in a.option_strings}
        return None if argv[0] in known else f"no option {argv[0]}"
    command = commands.get(argv[0])
    if command is None:
        return f"no command {argv[0]!r} (commands: {', '.join(sorted(commands))})"
    options = {s for a in command._actions for s in a.option_strings}
    shown = [w.strip("[]") for w in argv[1:]]
    for word in shown:
        if word.startswith("-") and word.split("=")[0] not in options:
            return f"{argv[0]} has no option {word.split('=')[0]}"
    if complete and "[" not in words and "QUEUE" not in words:
        try:
            command.parse_args(argv[1:])
        except SystemExit:
            return f"{argv[0]} does not accept {' '.join(argv[1:])!r}"
    return None


def test_cli_lines_name_real_commands_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    problems = []
    lines = list(cli_lines())
    assert len(lines) > 20, "the CLI lines of docs/operations.md were not found: the parser of this test broke"
    for where, words, complete in lines:
        problem = cli_problem(words, complete)
        if problem:
            problems.append(f"{where}: funboost_like {words}: {problem}")
    capsys.readouterr()  # argparse's own complaints
    report(problems)


def script_problems(text: str) -> list[str]:
    """`python benchmarks/latency.py --brokers X` names a script of the repository and options it defines
    (a `"--brokers"` in it, or in a helper module of its folder)."""
    problems = []
    pattern = r"python3? ((?:benchmarks|scripts|test_frame|tests)/[\w/.-]+\.py)((?: +[^\s#`|]+)*)"
    for match in re.finditer(pattern, text):
        script = REPO / match.group(1)
        if not script.exists():
            problems.append(f"{match.group(1)}: no such script")
            continue
        sources = "".join(f.read_text(encoding="utf-8") for f in script.parent.glob("*.py"))
        for option in re.findall(r"(?<!\S)(--[\w-]+)", match.group(2)):
            if f'"{option}"' not in sources and f"'{option}'" not in sources:
                problems.append(f"{match.group(1)} has no option {option}")
    return problems


def test_script_lines_name_real_scripts_and_options() -> None:
    problems = [f"{span.where}: {problem}" for span in all_spans() for problem in script_problems(span.text)]
    for block in all_blocks():
        if block.lang != "python":
            problems += [f"{block.where}: {problem}" for problem in script_problems(block.text)]
    report(problems)


# ------------------------------------------------------------------------------------ the checks themselves


def test_checks_catch_wrong_names(tmp_path: Path) -> None:
    """Each check finds a wrong name in a page (a page of this test, not of docs/)."""
    page = tmp_path / "bad.md"
    page.write_text("Set `REDIS_URLL`.\n\n```python\nfrom funboost_like import task_dec\n"
                    "@task_deco('q', qpss=1)\ndef f(): pass\n```\n\n`funboost_like queuez`\n\n"
                    "```python\nx = (\n```\n", encoding="utf-8")
    blocks, spans = parse_markdown(page)
    assert [b.fragment for b in blocks] == [False, False]
    assert name_problem("funboost_like.task_dec") and not name_problem("funboost_like.task_deco")
    assert name_problem("funboost_like.core.nothere") and not name_problem("funboost_like.core.config.DEFAULTS")
    assert looks_like_setting("REDIS_URLL") and "REDIS_URLL" not in SETTINGS
    assert not looks_like_setting("REDIS_STREAM")
    assert "qpss" not in ACCEPTED_PARAMS and "qps" in ACCEPTED_PARAMS and "countdown" in ACCEPTED_OPTIONS
    assert path_problems("`brokers/redis_lis.py`, python -m test_frame.test_rpc.nope") == [
        "brokers/redis_lis.py: no such file", "test_frame.test_rpc.nope: no such module"]
    assert not path_problems("brokers/redis_list.py, mysite/settings.py, python -m test_frame.test_rpc.test_consume")
    assert slug("Several files per SQLite queue (`SQLITE_FILES_PER_QUEUE`)") == \
        "several-files-per-sqlite-queue-sqlite_files_per_queue"
    assert "settings" in anchors(REPO / "docs" / "kafka.md") and "setting" not in anchors(REPO / "docs" / "kafka.md")
    assert script_problems("python benchmarks/latency.py --brokers X --nope 1") == [
        "benchmarks/latency.py has no option --nope"]
    assert script_problems("python benchmarks/latenc.py") == ["benchmarks/latenc.py: no such script"]
    assert booster_problem(["consumer", "estimat"]) == "fn.consumer has no 'estimat'"
    assert booster_problem(["pushh"]) and not booster_problem(["broker", "join"])
    assert default_problem("SQLITE_LEASE_SECONDS", "`15.0`") is None
    assert default_problem("SQLITE_LEASE_SECONDS", "20") and default_problem("LOG_COLOR", "False")
    assert default_problem("KOMBU_URL", '`""` (the RabbitMQ URL)') is None
    assert unimported_public_names(ast.parse("@task_deco('q')\ndef f(): pass")) == ["task_deco"]
    imported = "from funboost_like import task_deco\n@task_deco('q')\ndef f(): pass"
    assert unimported_public_names(ast.parse(imported)) == []
    assert cli_problem("queuez", False) and not cli_problem("queues --json", True)
    assert cli_problem("web --nope", False) and cli_problem("status", True) and not cli_problem("status", False)
    with pytest.raises(SyntaxError):
        compile(blocks[1].text, "bad.md", "exec")


def test_the_rpc_page_says_where_every_broker_kind_keeps_results() -> None:
    """docs/rpc.md's table of where results are kept listed three kinds of the twenty."""
    from funboost_like.brokers.registry import BROKERS

    text = (REPO / "docs" / "rpc.md").read_text(encoding="utf-8")
    section = text.split("## Where records are kept", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = [kind.name for kind, spec in BROKERS.items()
               if spec is not None and not any(f"`{kind.name}`" in row.split("|")[1] for row in rows)]
    assert not missing, f"docs/rpc.md does not say where these kinds keep results: {missing}"
