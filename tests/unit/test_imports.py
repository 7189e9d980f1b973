"""The module layout: no import cycles among bigtrain's modules (function-level imports counted), the
config module imports neither export nor engine, and the quantizer and the CPU-only tools (the
memory model and ``bigtrain estimate``) load no DeepSpeed."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "bigtrain"
# Cycles allowed: none (generate <-> trainer went when run.py took model_config and the build).
KNOWN_CYCLES: list[set] = []


def _modules() -> dict:
    """bigtrain's module names -> (path, whether it is a package's __init__)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if pkg else parts)] = (f, pkg)
    return out


def import_graph() -> dict:
    """module -> the bigtrain modules it imports anywhere in it (module level or inside functions)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, (f, pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = m.split(".") if pkg else m.split(".")[:-1]
                if node.level:
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[m].update(n for n in names if n in mods and n != m)
    return graph


def cycles(graph: dict) -> list[set]:
    """The strongly connected components of more than one module."""
    order, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return out


def test_import_graph_sees_function_level_imports():
    g = import_graph()
    assert "bigtrain.dist" in g["bigtrain.engine.core"]
    assert "bigtrain.engine.build" in g["bigtrain.memory"]  # imported inside a function
    assert "bigtrain.generate" in g["bigtrain.commands.generate"]  # inside a function, up a package
    assert "bigtrain.engine.build" in g["bigtrain.engine.gather"]  # relative, within the package
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def function_level_imports() -> tuple[int, int]:
    """(imports inside functions, those of them that import a bigtrain module) in the package."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for f, _ in _modules().values():
        visit(ast.parse(f.read_text()), False)
    total, own = len(found), 0
    for imp in found:
        if isinstance(imp, ast.ImportFrom):
            own += bool(imp.level or (imp.module or "").startswith("bigtrain"))
        else:
            own += any(a.name.startswith("bigtrain") for a in imp.names)
    return total, own


def test_function_level_imports_are_the_deliberate_ones():
    """Imports sit at the top of their module except the deliberate ones, each module saying why
    once: DeepSpeed, Triton, torch._dynamo, W&B, TensorBoard, matplotlib and the other tools'
    estimators where used; torch in the modules the CLI reads to build its parsers (cli, commands/,
    config, presets, memory, estimate, measure_report); each command's own work. 170 (89 of bigtrain's
    own modules) before bigtrain/commands/ took the parsers out of the modules that do the work; a
    new one belongs to one of these kinds, and changes the count here."""
    assert function_level_imports() == (72, 29)


def test_every_command_module_is_registered():
    from bigtrain import cli

    modules = {f.stem for f in (PACKAGE / "commands").glob("*.py") if f.stem != "__init__"}
    assert {c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS} == modules


def test_no_import_cycles():
    found = cycles(import_graph())
    assert all(c in KNOWN_CYCLES for c in found), found


def test_engine_package_init_holds_no_code():
    tree = ast.parse((PACKAGE / "engine" / "__init__.py").read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr)  # the docstring only


def _loaded(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent).stdout.strip()


def test_config_imports_no_export_or_engine():
    code = ("import sys, bigtrain.config; "
            "print(sorted(m for m in sys.modules if m.startswith('bigtrain')))")
    assert _loaded(code) == "['bigtrain', 'bigtrain.config']"


def test_quantize_memory_and_estimate_load_no_deepspeed_or_engine():
    code = ("import sys, bigtrain.quantize, bigtrain.memory, bigtrain.estimate; "
            "print('deepspeed' in sys.modules, any(m.startswith('bigtrain.engine') for m in sys.modules))")
    assert _loaded(code) == "False False"


def test_no_private_name_crosses_a_module():
    """A name with a leading underscore is its module's own: no other bigtrain module imports it."""
    crossing = []
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("bigtrain")):
                crossing += [f"{f.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not crossing, crossing
