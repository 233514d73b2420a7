"""Framework internals stay behind their fences: a private name (`_name`) of faust (with mode, the
library it is built on), aiokafka or Streamlit is touched only in that framework's hooks module,
so upgrading a framework means reading one module. An AST scan of the five packages, no imports:

- `x._name` where `x` is a framework import (`AIOKafkaConsumerThread._create_worker_consumer`), or
  an object whose `_name` none of our own classes or modules defines (`app.consumer._committed_offset`);
- `super()._name`, anywhere;
- in a subclass of a framework class, any private name, defined or used on `self`: an override of
  the framework's internals, or a name that shadows one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "models", "export_onnx", "state", "stream")
FRAMEWORKS = ("faust", "mode", "aiokafka", "streamlit")
FENCES = {"stream/faust_hooks.py": ("faust", "mode"), "stream/aiokafka_hooks.py": ("aiokafka",)}
# Underscored by the standard library's convention, public all the same (namedtuple, os).
STDLIB_PUBLIC = {"_asdict", "_replace", "_fields", "_make", "_field_defaults", "_exit"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imports(tree: ast.AST) -> dict[str, str]:
    """Local name -> the module path it was imported from (every scope of the module)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _from_framework(node: ast.expr, imports: dict[str, str]) -> bool:
    root = _root(node)
    return isinstance(root, ast.Name) and imports.get(root.id, "").split(".")[0] in FRAMEWORKS


def _framework_classes(tree: ast.AST, imports: dict[str, str]) -> list[ast.ClassDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
            and any(_from_framework(b, imports) for b in n.bases)]


def _own_names(trees: list[ast.AST]) -> set[str]:
    """Private names our code defines: functions, classes, module names, `self._x` attributes,
    class fields (not in framework subclasses, whose private names are the framework's)."""
    names: set[str] = set()
    for tree in trees:
        skip = {id(n) for c in _framework_classes(tree, _imports(tree)) for n in ast.walk(c)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.add(node.attr)
    return {n for n in names if _private(n)}


def _is_super(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def reaches_inside(source: str, own: set[str]) -> list[str]:
    """Where `source` touches a framework's private names (line: what)."""
    tree = ast.parse(source)
    imports = _imports(tree)
    found = []
    inside = {id(n): c.name for c in _framework_classes(tree, imports) for n in ast.walk(c)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) in inside \
                and _private(node.name):
            found.append(f"{node.lineno}: {inside[id(node)]}.{node.name} in a framework subclass")
        if not (isinstance(node, ast.Attribute) and _private(node.attr)) or node.attr in STDLIB_PUBLIC:
            continue
        base = node.value
        if _is_super(base):
            found.append(f"{node.lineno}: super().{node.attr}")
        elif isinstance(base, ast.Name) and base.id in ("self", "cls"):
            if id(node) in inside:
                found.append(f"{node.lineno}: self.{node.attr} in framework subclass {inside[id(node)]}")
        elif _from_framework(base, imports):
            found.append(f"{node.lineno}: {ast.unparse(node)} (a framework import)")
        elif isinstance(_root(base), ast.Name) and _root(base).id in imports:
            continue  # a module or name imported from elsewhere: not a framework's object
        elif node.attr not in own:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def _modules() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text()
            for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def test_framework_internals_are_touched_only_behind_their_fences():
    modules = _modules()
    own = _own_names([ast.parse(s) for path, s in modules.items() if path not in FENCES])
    outside = {path: found for path, source in modules.items()
               if path not in FENCES and (found := reaches_inside(source, own))}
    assert not outside, outside


@pytest.mark.parametrize("fence", FENCES)
def test_each_fence_is_where_its_framework_is_reached(fence: str):
    """The scan sees what the fences do (so its silence elsewhere means something), and each
    fence names its framework."""
    source = (ROOT / fence).read_text()
    own = _own_names([ast.parse(s) for path, s in _modules().items() if path not in FENCES])
    assert reaches_inside(source, own)
    assert any(imp.split(".")[0] in FENCES[fence] for imp in _imports(ast.parse(source)).values()) \
        or fence == "stream/aiokafka_hooks.py"


def test_the_scan_finds_what_the_fences_are_for():
    own = {"_own_helper"}
    source = '''
from faust.sensors.prometheus import PrometheusMonitor
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
import os

class WorkerMonitor(PrometheusMonitor):
    def _clear_partition_related_metrics(self):
        self._metrics.clear()
        super()._clear_partition_related_metrics()

    def export(self):
        return self.public

def ready(app, thing):
    os._exit(75)
    thing._own_helper()
    create = AIOKafkaConsumerThread._create_worker_consumer
    return app.consumer._committed_offset
'''
    found = reaches_inside(source, own)
    assert [f.split(":")[0] for f in found] == ["7", "8", "9", "17", "18"], found


def test_the_serving_contract_names_every_module_of_the_worker_side():
    """import-linter's forbidden contract lists its modules: a new module of `stream` (the entry
    points aside, which reach everything) must be named there, or it could import torch unseen."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    serving = next(c for c in config["contracts"] if c["id"] == "serving")
    assert {"torch", "models", "mlflow"} <= set(serving["forbidden_modules"])
    entry_points = {"stream/cli.py", "stream/demo.py", "stream/__init__.py"}
    worker_side = {str(p.relative_to(ROOT))[:-3].replace("/", ".") for p in (ROOT / "stream").glob("*.py")
                   if str(p.relative_to(ROOT)) not in entry_points}
    assert worker_side - set(serving["source_modules"]) == set()
    assert {"features", "state", "export_onnx.runtime", "export_onnx.scoring"} <= set(serving["source_modules"])
