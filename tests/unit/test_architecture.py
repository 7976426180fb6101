"""The house's rules, checked on the source: no import cycle, and imports only go down the layers.

Every import counts, also one inside a function (a lazy import still ties two modules together).
The layers, top to bottom (docs/ARCHITECTURE.md explains them):

    docqueue (the face, docqueue/__init__.py)  the few names a user imports
    tasks                                  the Celery layer, the CLI, the public API
    workers.jobs                           a job's life
    workers.batch                          one batch delivery
    workers.provider                       calling the model
    workers.pipelines                      what is asked of the model
    workers.ingest                         reading and cutting documents
    workers.{settings,errors,tokens,keys,clock,metrics}   shared names
    models                                 the tables

Every name is under the one import package, `docqueue.` (left out above).
A module may import from its own layer and the layers below it. `workers.local` and
`workers.testing` (tools for testing: the provider simulator) stand beside the layers: they
import only the shared names and models, and only `tasks` imports them.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "workers", "tasks")
FOUNDATION = tuple(f"docqueue.workers.{m}"
                   for m in ("settings", "errors", "tokens", "keys", "clock", "metrics"))
LAYERS: list[tuple[str, ...]] = [
    ("docqueue",),
    ("docqueue.tasks",),
    ("docqueue.workers.jobs",),
    ("docqueue.workers.batch",),
    ("docqueue.workers.provider",),
    ("docqueue.workers.pipelines",),
    ("docqueue.workers.ingest",),
    FOUNDATION,
    ("docqueue.models",),
]
BESIDE = ("docqueue.workers.local", "docqueue.workers.testing")


def module_files() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("docqueue", *parts))] = path
    found["docqueue"] = ROOT / "docqueue" / "__init__.py"
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> Iterator[str]:
    """The project modules `name` imports, wherever in the file the import stands."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    yield target  # `from package import module`
                elif base in modules:
                    yield base


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: set(imports_of(name, path, names)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int | None:
    # The most specific layer wins: `docqueue` (the face) holds every other name as a prefix.
    found = [(max(len(p) for p in prefixes if _within(module, (p,))), i)
             for i, prefixes in enumerate(LAYERS) if _within(module, prefixes)]
    return max(found)[1] if found else None


def _side_of(module: str) -> str:
    return next(p for p in BESIDE if _within(module, (p,)))


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer, or into a side package from anywhere but `tasks`."""
    wrong = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _within(source, BESIDE) and _within(target, BESIDE):
                if _side_of(source) != _side_of(target):
                    wrong.append(f"{source} -> {target} (side packages are independent)")
                continue
            if _within(target, BESIDE):
                if not _within(source, ("docqueue.tasks",)):
                    wrong.append(f"{source} -> {target} (only tasks uses {target})")
                continue
            if _within(source, BESIDE):
                if not _within(target, (*FOUNDATION, "docqueue.models")):
                    wrong.append(f"{source} -> {target} (a side package uses shared names only)")
                continue
            low, high = layer_of(source), layer_of(target)
            if low is None or high is None:
                wrong.append(f"{source} -> {target} (a module outside the declared layers)")
            elif high < low:
                wrong.append(f"{source} -> {target} (imports a layer above its own)")
    return wrong


def test_the_project_has_no_import_cycle() -> None:
    # Given every import of every module, lazy ones included
    graph = import_graph()
    # Then no two modules reach each other
    assert cycles(graph) == []


def test_imports_only_go_down_the_layers() -> None:
    assert forbidden_imports(import_graph()) == []


def test_every_module_is_in_a_layer() -> None:
    unplaced = [m for m in module_files()
                if layer_of(m) is None and not _within(m, BESIDE) and m != "docqueue.workers"]
    assert unplaced == []


def test_workers_and_models_never_import_celery() -> None:
    # The work runs from a REPL; only tasks/ knows Celery.
    offenders = []
    for name, path in module_files().items():
        if _within(name, ("docqueue.workers", "docqueue.models")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                            else [node.module or ""])
                    offenders += [f"{name}: {m}" for m in mods if m.split(".")[0] in
                                  ("celery", "kombu")]
    assert offenders == []


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    # Given a small graph with both faults planted
    a, b = "docqueue.workers.ingest.a", "docqueue.workers.jobs.b"
    graph = {a: {b}, b: {a}, "docqueue.models.c": set()}
    # Then both checks report them
    assert cycles(graph) == [[a, b]]
    assert forbidden_imports(graph) == [f"{a} -> {b} (imports a layer above its own)"]


BARE_IMPORT = re.compile(rf"\b(?:from|import) (?:{'|'.join(PACKAGES)})\b[.\w]* import")


def test_every_import_of_ours_goes_through_the_one_package_name() -> None:
    # Given every Python file of the repository (code, tests, benchmarks, examples)
    bare = []
    for folder in (*PACKAGES, "docqueue", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom)
                         and not node.level else [])
                bare += [f"{path.relative_to(ROOT)}: {n}" for n in names
                         if n.split(".")[0] in PACKAGES]
                # Code run in a child process (`python -c "from tasks.cli import ..."`) too
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    bare += [f"{path.relative_to(ROOT)}: {m.group(0)!r}"
                             for m in BARE_IMPORT.finditer(node.value)]
    # Then none names `models`, `workers` or `tasks` at the top: a user's own modules of those
    # names must never be ours, nor ours theirs
    assert bare == []


# The one clock: every read of the wall or monotonic clock in workers/ and tasks/ goes through
# workers/clock.py (its docstring names what is left out, and why).
CLOCK_READS = {("time", "time"), ("time", "monotonic"), ("datetime", "now"), ("datetime", "utcnow")}
CLOCK_EXEMPT = (
    "docqueue.workers.clock",
    "docqueue.workers.testing",  # the provider simulator keeps its own clock
)


def clock_reads(source: str) -> list[str]:
    """Each direct read of a clock in `source`: `time.time()`, `time.monotonic()`,
    `datetime.now(...)`, `datetime.utcnow()` (also as `datetime.datetime.now`), or one of those
    functions imported by name from `time`."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = (owner.id if isinstance(owner, ast.Name)
                          else owner.attr if isinstance(owner, ast.Attribute) else None)
            if (owner_name, node.func.attr) in CLOCK_READS:
                found.append((node.lineno, f"{owner_name}.{node.func.attr}()"))
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found += [(node.lineno, f"from time import {a.name}") for a in node.names
                      if ("time", a.name) in CLOCK_READS]
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_only_the_clock_module_reads_the_clock() -> None:
    # Given every module of workers/ and tasks/ but the clock and the declared exceptions
    offenders = []
    for name, path in module_files().items():
        if _within(name, ("docqueue.workers", "docqueue.tasks")) and not _within(name,
                                                                              CLOCK_EXEMPT):
            offenders += [f"{name}: {read}"
                          for read in clock_reads(path.read_text(encoding="utf-8"))]
    # Then none reads the wall clock or the monotonic clock itself
    assert offenders == []


def test_the_clock_check_sees_every_kind_of_read() -> None:
    # Given a source with each kind of direct read, and one through the clock module
    source = (
        "import time, datetime as dt\n"
        "from datetime import UTC, datetime\n"
        "from time import monotonic\n"
        "a = time.time()\n"
        "b = time.monotonic()\n"
        "c = datetime.now(UTC)\n"
        "d = dt.datetime.utcnow()\n"
        "e = clock.utc_now()\n"
        "f = time.perf_counter()\n"
    )
    # When it is scanned / Then every direct read is named, and only those
    assert clock_reads(source) == [
        "line 3: from time import monotonic",
        "line 4: time.time()",
        "line 5: time.monotonic()",
        "line 6: datetime.now()",
        "line 7: datetime.utcnow()",
    ]


# What a producer process may not load: the model client stack (langchain, the OpenAI SDK) is
# the worker's, and the document parsers load with the first file of their kind. Together they
# were about 70 MB of `docq submit`'s peak memory and a second or more of its start-up.
PRODUCER_NEVER_LOADS = ("langchain_openai", "langchain_core", "openai", "pypdf", "bs4", "docx")


def test_a_producer_does_not_load_the_model_client_or_the_parsers() -> None:
    code = ("import json, sys; import docqueue.tasks, docqueue.tasks.cli; "
            "from docqueue import submit, JobHandle; "
            "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    loaded = set(json.loads(out))
    assert "docqueue" in loaded  # the check itself ran
    assert loaded.isdisjoint(PRODUCER_NEVER_LOADS), sorted(loaded & set(PRODUCER_NEVER_LOADS))
