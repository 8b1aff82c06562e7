"""The package's layout: its modules import each other without cycles and without reaching
into each other's private names."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastmix"


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
EXTENSIONS = {"fastmix._C"}  # compiled, imported as a module


def _imports(name):
    """(imported module, imported name or None) for every fastmix import in module `name`,
    at any depth (a function's lazy import included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.startswith("fastmix"))
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = (base + ("." + node.module if node.module else "")) if node.level else node.module
            if source and source.startswith("fastmix"):
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    is_module = submodule in MODULES or submodule in EXTENSIONS
                    yield (submodule, None) if is_module else (source, alias.name)


def _graph():
    return {name: {module for module, _ in _imports(name) if module in MODULES and module != name}
            for name in MODULES}


def test_no_module_imports_a_private_name_of_another():
    private = [f"{name} imports {imported} from {module}" for name in MODULES for module, imported in _imports(name)
               if imported is not None and imported.startswith("_") and not imported.startswith("__")]
    assert not private, "\n".join(private)


def test_no_private_module_is_imported_from_outside_its_package():
    private = []
    for name in MODULES:
        for module, _ in _imports(name):
            package, _, last = module.rpartition(".")
            if last.startswith("_") and not last.startswith("__") and module in MODULES \
                    and not (name == package or name.startswith(package + ".")):
                private.append(f"{name} imports {module}")
    assert not private, "\n".join(private)


def test_the_modules_import_each_other_without_a_cycle():
    graph = _graph()
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for module in sorted(graph[name]):
            if state.get(module) == "open":
                cycle = path[path.index(module):] + [module]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if module not in state:
                visit(module, path + [module])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_layout_checks_see_the_imports():
    """The checks above would pass on a parser that saw nothing: they must see known imports."""
    assert "fastmix.distributed" in _graph()["fastmix.mixing.dga"]
    assert ("fastmix.probe.rules", "rule_for") in set(_imports("fastmix.probe.core"))
