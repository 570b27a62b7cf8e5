"""The framework's modules import each other without cycles.

Every module under framework/ is parsed (ast, nothing imported) and every import of a framework
module becomes an edge, function-local imports included: a cycle hidden inside a function is
still a cycle. `if TYPE_CHECKING:` blocks are left out (they never run). Importing `a.b.c` also
runs the package faces `a/__init__.py` and `a/b/__init__.py` first, so those are edges too,
except a module's own packages (already being imported when the module runs).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    """{dotted name: path} of every module of the framework package."""
    out = {}
    base = os.path.join(ROOT, "framework")
    for root, _dirs, files in os.walk(base):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(root, f)
    return out


def _is_type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree, name: str, is_package: bool):
    """The dotted names a module imports (absolute and relative), TYPE_CHECKING blocks left out,
    function bodies included."""
    out = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module
                                                                    else []))
            else:
                base = node.module or ""
            out.append(base)
            out.extend(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        edges = set()
        for target in _imports(tree, name, path.endswith("__init__.py")):
            if target not in mods:
                continue  # a name inside a module, or not ours
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the target and the package faces it runs
                dep = ".".join(parts[:i])
                if dep in mods and dep not in own:
                    edges.add(dep)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_framework_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 60 and "framework.config" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    """The check can fail: a cycle through a function-local import, and one through a package
    face, are both found; a TYPE_CHECKING import is not an edge."""
    tree = ast.parse("def f():\n    from framework.b import x\n")
    assert _imports(tree, "framework.a", False) == ["framework.b", "framework.b.x"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                     "    from framework.b import x\n")
    assert "framework.b" not in _imports(tree, "framework.a", False)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_layer_imports_no_torch():
    """framework.config (what train.py needs to report a config error) reaches no module that
    imports torch or megatron-core at module level: the model families' light halves only."""
    graph = import_graph()
    mods = _modules()
    seen, todo = set(), ["framework.config"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(open(mods[name], encoding="utf-8").read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        heavy = [a.name for n in top if isinstance(n, ast.Import) for a in n.names] + \
            [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        assert not [h for h in heavy if h.split(".")[0] in ("torch", "megatron")], name
        for n in top:  # module-level framework imports only: function bodies run on call
            targets = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            for t in targets:  # the module and the package faces it runs
                parts = t.split(".")
                todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                            if ".".join(parts[:i]) in graph)
    assert "framework.models.registry" in seen
