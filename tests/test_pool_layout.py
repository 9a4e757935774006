"""The shape of the code, checked from its source: no import cycle in ``spoon/``, a pool that
never imports the server module, and no private member of another object used in it.

Run the cycle check alone with::

    .venv/bin/python -m pytest tests/test_pool_layout.py -k cycle -q

Imports are read from each module's syntax tree, function-level imports included (a cycle
through an import inside a function is still a cycle: it only moves the failure to run
time).
"""

import ast
import os

from support import ROOT

SPOON = os.path.join(ROOT, "spoon")


def module_files():
    """{module name: path} of every module under spoon/."""
    found = {}
    for folder, _, files in os.walk(SPOON):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[: -len(".__init__")]
            found[rel] = path
    return found


def spoon_imports(module, path, known):
    """The spoon modules ``module`` imports, anywhere in its file."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            # "from spoon import server" imports the module spoon.server.
            names.update("%s.%s" % (base, alias.name) for alias in node.names)
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module and name.startswith("spoon"):
            found.add(name)
    return found


def import_graph():
    files = module_files()
    return {module: spoon_imports(module, path, files) for module, path in files.items()}


def find_cycles(graph):
    """Every cycle, as a list of modules, found by depth-first search."""
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"spoon.a": {"spoon.b"}, "spoon.b": {"spoon.c"}, "spoon.c": {"spoon.a"}, "spoon.d": set()}
    assert find_cycles(graph) == [["spoon.a", "spoon.b", "spoon.c", "spoon.a"]]
    source = "def f():\n    from spoon import server\n"
    tree = ast.parse(source)
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))


def test_no_import_cycle_in_spoon():
    graph = import_graph()
    assert "spoon.server" in graph and "spoon.pool.supervisor" in graph
    assert find_cycles(graph) == []


def test_the_pool_never_imports_the_server_module():
    graph = import_graph()
    for module in graph:
        # The command line resolves the user's target (maybe a server class): it is an
        # entry point, not the pool.
        if module.startswith("spoon.pool") and module not in ("spoon.pool.cli", "spoon.pool.__main__"):
            assert "spoon.server" not in reachable(graph, module) | {module}, module


def private_uses(path):
    """``x._name`` where ``x`` is not ``self`` (nor ``os._exit``): a private member of
    another object, read or written."""
    tree = ast.parse(open(path).read(), path)
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Name) and owner.id == "os" and name == "_exit":
            continue
        uses.append("%s:%d %s" % (os.path.basename(path), node.lineno, ast.unparse(node)))
    return uses


def test_the_pool_uses_no_private_member_of_another_object():
    pool = os.path.join(SPOON, "pool")
    uses = []
    for name in sorted(os.listdir(pool)):
        if name.endswith(".py"):
            uses += private_uses(os.path.join(pool, name))
    assert uses == []


def test_the_private_member_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f(server):\n    server._reload()\n    self._ok = 1\n")
    assert private_uses(str(probe)) == ["probe.py:2 server._reload"]
