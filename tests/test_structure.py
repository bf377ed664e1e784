"""The shape of the code: no import cycles, no upward imports between the layers.

Layers, lowest first: ``client`` (the SDK, the stores, the registry core), ``mountfs`` (the
drive, built on the SDK), ``server`` (the registry server, built on the registry core).  A
module may import its own layer and the ones below, never one above (``client`` importing
``mountfs`` or ``server``, ``mountfs`` importing ``server``), not even inside a function.

Module-level imports (those run when a module is imported; ``if TYPE_CHECKING:`` blocks are
not) must form no cycle: a cycle works or breaks depending on which module is imported
first.  Imports inside functions are the accepted way to refer to a module above in the
mutual object graph (``Artifact.collection`` -> ``ArtifactCollection`` -> ``Artifact``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("client", "mountfs", "server")
#: what each package may import of the others
ALLOWED = {"client": {"client"}, "mountfs": {"client", "mountfs"}, "server": {"client", "server"}}


#: Alembic's scripts (env.py, revisions) run inside Alembic's own context, never imported
SCRIPTS = ("client/registry/migrations",)


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``); Alembic scripts left out."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if any(path.is_relative_to(root / s) for s in SCRIPTS):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, known: dict) -> list[str]:
    """The modules an import statement names (a submodule where ``from pkg import sub`` names one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """The import statements executed when the module is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node.test):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def import_graph(root: Path = ROOT, *, module_level: bool) -> dict[str, set[str]]:
    """module -> the modules it imports (of every package, ours or not)."""
    known = modules(root)
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        nodes = (_module_level(tree.body) if module_level
                 else (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))))
        graph[mod] = {t for n in nodes for t in _targets(mod, is_pkg, n, known) if t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start] & graph.keys())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w] & graph.keys()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for mod, targets in import_graph(root, module_level=False).items():
        layer = mod.split(".")[0]
        for t in sorted(targets):
            top = t.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[layer]:
                bad.append(f"{mod} imports {t}")
    return bad


def test_no_import_cycles_at_module_level() -> None:
    assert cycles(import_graph(module_level=True)) == []


def test_no_upward_imports_between_layers() -> None:
    assert upward_imports() == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The two checks above are not vacuous: they find what they look for."""
    root = _write(tmp_path, {
        "client/__init__.py": "", "mountfs/__init__.py": "", "server/__init__.py": "",
        "client/a.py": "from . import b\n",
        "client/b.py": "from .c import X\n",
        "client/c.py": "from client.a import Y\nif TYPE_CHECKING:\n    from .d import Z\n",
        "client/d.py": "from .c import X\n",  # d -> c only: no cycle (c -> d is for the type checker)
        "client/e.py": "def f():\n    from mountfs import ops\n",
        "mountfs/ops.py": "import server.app\n",
        "server/app.py": "import client.a\n",
    })
    assert cycles(import_graph(root, module_level=True)) == [["client.a", "client.b", "client.c"]]
    assert upward_imports(root) == ["client.e imports mountfs.ops", "mountfs.ops imports server.app"]


_IMPORT_EACH = r"""
import importlib, os, sys, traceback
OURS = ("client", "mountfs", "server")
names = sys.argv[1:]
# A first child imports everything and reports the third-party modules it loaded; the parent
# loads those, so that each of our modules, first imported in a forked child with none of our
# packages loaded (what a fresh interpreter sees of them), costs milliseconds.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    os.write(w, " ".join(m for m in list(sys.modules) if m.split(".")[0] not in OURS).encode())
    os._exit(0)
os.close(w)
with os.fdopen(r) as f:
    third_party = f.read().split()
os.waitpid(pid, 0)
for m in third_party:
    try:
        importlib.import_module(m)
    except BaseException:
        pass
assert not any(m.split(".")[0] in OURS for m in sys.modules)
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("imported", len(names) - len(failed), "failed", *failed)
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    names = sorted(modules())
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.split() == ["imported", str(len(names)), "failed"]
