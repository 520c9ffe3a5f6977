"""The library (`m2rnn`) never depends on the applications (`m2rnn.apps`), and no module-level import circle exists.

Read from the source with `ast`, so every module counts, including those a test run never imports."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "m2rnn"
APPS = "m2rnn.apps"
# Old import paths of the applications: each is a deprecation shim (tests/test_deprecated_paths.py); the console
# script shim `m2rnn.cli` and `python -m m2rnn` forward to the command line.
SHIMS = {"m2rnn.cli", "m2rnn.__main__", "m2rnn.hub", "m2rnn.demo", "m2rnn.utils", "m2rnn.eval", "m2rnn.heal",
         "m2rnn.conversion"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_app(name: str) -> bool:
    return name == APPS or name.startswith(APPS + ".")


def is_shim_path(name: str) -> bool:
    return any(name == shim or name.startswith(shim + ".") for shim in SHIMS)


def imports(name: str) -> list[tuple[str, bool, int]]:
    """`(imported m2rnn module, at module level?, line)` for every import statement (and `import_module("...")`
    call) in the module; `from pkg import sub` names the submodule when `sub` is one."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy.update(id(child) for child in ast.walk(node))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lazy.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                targets = [node.args[0].value]
        found += [(t, id(node) not in lazy, node.lineno) for t in targets if t == "m2rnn" or t.startswith("m2rnn.")]
    return found


def test_the_library_never_imports_the_applications():
    offenders = sorted({
        f"{name} (line {line}) imports {target}"
        for name in MODULES if not is_app(name) and name not in SHIMS
        for target, _, line in imports(name) if is_app(target) or is_shim_path(target)
    })
    assert not offenders, "library modules import the applications (or their old paths):\n" + "\n".join(offenders)


def test_old_application_paths_are_only_shims():
    """`m2rnn.hub`, `m2rnn.eval`, ... hold no code of their own: they forward to `m2rnn.apps`."""
    for name in sorted(SHIMS):
        assert name in MODULES, f"{name}: the shim is missing"
        below = [other for other in MODULES if other.startswith(name + ".")]
        assert not below, f"{name} still has modules of its own: {below}"
        targets = {target for target, _, _ in imports(name)}
        assert targets and targets <= {"m2rnn._deprecated", "m2rnn.apps.cli"}, f"{name} imports {targets}"


def module_level_cycles() -> list[list[str]]:
    graph = {name: sorted({t for t, top, _ in imports(name) if top and t in MODULES and t != name}) for name in MODULES}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_no_module_level_import_cycle():
    cycles = module_level_cycles()
    assert not cycles, "import cycles among m2rnn modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_see_a_violation(monkeypatch, tmp_path):
    """The checks can fail: a library module importing an application, and a two-module circle, are both found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .apps.hub import push_to_hub\nfrom . import hub\nfrom .modeling_m2rnn import M2RNNModel\n")
    monkeypatch.setitem(MODULES, "m2rnn.configuration_m2rnn", probe)
    assert {"m2rnn.apps.hub", "m2rnn.hub"} <= {target for target, _, _ in imports("m2rnn.configuration_m2rnn")}
    with pytest.raises(AssertionError, match="m2rnn.apps.hub"):
        test_the_library_never_imports_the_applications()
    assert any("m2rnn.configuration_m2rnn" in cycle for cycle in module_level_cycles())  # modeling imports config


def test_import_m2rnn_loads_no_application_and_installs_no_import_hook():
    code = (
        "import sys, torch, transformers\n"
        "hooks = list(sys.meta_path)\n"
        "import m2rnn\n"
        "apps = sorted(m for m in sys.modules if m.startswith('m2rnn.apps') or m in %r)\n"
        "assert not apps, apps\n"
        "added = [f for f in sys.meta_path if f not in hooks or type(f).__module__.startswith('m2rnn')]\n"
        "assert not added, added\n"
    ) % sorted(SHIMS)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
