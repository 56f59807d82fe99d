"""The shape of the package, read from its source (AST, nothing imported): which modules import
which, that dependencies point one way, and that functions and engine files stay short enough to
read at once (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "qwen2audio"
MAX_FUNCTION_LINES = 60
MAX_ENGINE_FILE_LINES = 250
PARSER_BUILDERS = {"build_parser"}  # argparse builders: a flat list of add_argument calls


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def imports_of(name: str, parents: bool = True) -> frozenset[str]:
    """Modules of the package that ``name`` imports anywhere in its source (function bodies and
    TYPE_CHECKING blocks included) and, with ``parents``, its parent subpackage, whose __init__ runs
    first. The root package is the public facade and counts only when imported by name."""
    known = modules()
    path = known[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    parent = name.rsplit(".", 1)[0]
    if parents and parent != "qwen2audio" and parent != name and path.name != "__init__.py":
        found.add(parent)
    return frozenset(m for m in found if m in known and m != name)


def closure(name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        for target in imports_of(stack.pop()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_import_graph_has_no_cycle():
    """Over the imports the source writes (a package __init__ that re-exports its modules is no cycle)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(imports_of(name, parents=False)):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in modules():
        if name not in state:
            visit(name)
    assert len(modules()) > 30  # the walk saw the whole package


FRONT = ("qwen2audio.server", "qwen2audio.cli", "qwen2audio.chat_session", "qwen2audio.transcribe",
         "qwen2audio.evaluation", "qwen2audio.api", "qwen2audio.processor", "qwen2audio.hub",
         "qwen2audio.distributed")
EDGE = ("qwen2audio.text.prompt", "qwen2audio.audio.io")  # chat templates, audio decoding


@pytest.mark.parametrize("name", [m for m in modules() if m.startswith("qwen2audio.engine")])
def test_the_engine_depends_on_neither_front_ends_nor_templates_nor_decoding(name):
    reached = closure(name)
    bad = sorted(m for m in reached if m.startswith(FRONT) or m in EDGE or m == "qwen2audio")
    assert not bad, f"{name} reaches {bad}"
    assert "qwen2audio.model.qwen2_audio" in closure("qwen2audio.engine.core")  # the walk follows imports


@pytest.mark.parametrize("name", [m for m in modules() if m.startswith("qwen2audio.model")])
def test_the_model_depends_on_nothing_above_it(name):
    bad = sorted(m for m in closure(name) if m.startswith((*FRONT, "qwen2audio.engine")) or m in EDGE)
    assert not bad, f"{name} reaches {bad}"


def test_the_cli_goes_through_the_public_api():
    allowed = {"qwen2audio", "qwen2audio.errors", "qwen2audio.chat_session", "qwen2audio.transcribe",
               "qwen2audio.evaluation", "qwen2audio.server.launch", "qwen2audio.distributed.batch"}
    assert imports_of("qwen2audio.cli") <= allowed, sorted(imports_of("qwen2audio.cli") - allowed)


def test_only_the_commands_import_the_ray_package():
    """distributed/ needs the optional [ray] extra: only the commands import it (when run), and no
    module imports Ray at import time."""
    users = sorted(name for name in modules() if not name.startswith("qwen2audio.distributed")
                   and any(m.startswith("qwen2audio.distributed") for m in imports_of(name, parents=False)))
    assert users == ["qwen2audio.cli", "qwen2audio.server.launch"], users
    for name, path in modules().items():
        top_level = [node for node in ast.parse(path.read_text(encoding="utf-8")).body
                     if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
        assert not any(m == "ray" or m.startswith("ray.") for m in names), f"{name} imports Ray at import time"


def functions(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_60_lines():
    long = [f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in modules().values() for node in functions(path)
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and node.name not in PARSER_BUILDERS]
    assert not long, long


def test_engine_files_stay_short():
    for path in (PACKAGE / "engine").glob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_ENGINE_FILE_LINES, f"{path.name}: {lines} lines"


@pytest.mark.parametrize("name", ["qwen2audio.transcribe", "qwen2audio.chat_session", "qwen2audio.evaluation",
                                  "qwen2audio.server.app"])
def test_front_ends_type_their_model(name):
    """A front end names the Qwen2Audio it drives, so a reader (and a type checker) sees the API it uses."""
    untyped = [f"{node.name}({arg.arg})" for node in functions(modules()[name])
               for arg in [*node.args.args, *node.args.kwonlyargs]
               if arg.arg == "model" and (arg.annotation is None or ast.unparse(arg.annotation) != "Qwen2Audio")]
    assert not untyped, untyped
