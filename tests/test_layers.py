"""The package's imports run one way (DESIGN.md, "Layers"), with no cycle, lazy imports included.

Every ``import`` / ``from ... import`` of a ``scorekit`` module is read from the source (imports inside
functions count; ``if TYPE_CHECKING:`` blocks do not). Each module has a layer; an import must go to a
lower layer, or stay inside the same package at the same layer. A package's ``__init__`` may load its
own submodules (that is how it re-exports them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import scorekit

ROOT = Path(scorekit.__file__).parent

#: DESIGN.md's layer table, top (imports nothing of scorekit) to bottom (may import anything).
LAYERS: list[tuple[str, ...]] = [
    ("_util",),
    ("metrics", "data", "pfode", "threads", "_diffusers_unet"),
    ("process", "nets"),
    ("denoiser", "analytic"),
    ("schedules",),
    ("samplers",),
    ("samplers.fitted",),
    ("guidance",),
    ("inverse",),
    ("likelihood",),
    ("models",),
    ("train",),
    ("runs",),
    ("distill",),
    ("bench",),
    ("cli",),
    ("__main__",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path  # "" is the package itself
    return out


MODULES = _modules()


def _layer(mod: str) -> int:
    """The layer of ``mod``: its longest prefix listed in ``LAYERS``."""
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    if rank is None:
        raise AssertionError(f"module scorekit.{mod} has no layer in LAYERS: add it (DESIGN.md)")
    return rank


def _resolve(target: str) -> str | None:
    """The scorekit module an import names (``scorekit.a.b.func`` -> ``a.b``), or None."""
    if target != "scorekit" and not target.startswith("scorekit."):
        return None
    name = target[len("scorekit.") :] if target != "scorekit" else ""
    while name not in MODULES:
        if not name:
            return ""
        name = name.rpartition(".")[0]
    return name


def _imports(mod: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(sub) for sub in ast.walk(node))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = "scorekit" + (f".{pkg}" if pkg else "") + (f".{base}" if base else "")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            r = _resolve(t)
            if r is not None and r != mod:
                found.add(r)
    return found


def _edges() -> dict[str, set[str]]:
    edges = {}
    for mod, path in MODULES.items():
        # a package loading its own submodules is how it re-exports them, not a dependency
        children = mod + "." if mod else ""
        edges[mod] = {t for t in _imports(mod, path) if not (t.startswith(children) and t != mod)}
    return edges


def test_every_module_has_a_layer():
    for mod in MODULES:
        if mod:
            _layer(mod)


def test_imports_only_go_down_the_layers():
    bad = []
    for mod, targets in _edges().items():
        if not mod:
            continue
        for t in targets - {""}:  # the package root holds only __version__ and lazy loaders
            lm, lt = _layer(mod), _layer(t)
            same_package = mod.split(".")[0] == t.split(".")[0]
            if lt > lm or (lt == lm and not same_package):
                bad.append(f"scorekit.{mod} (layer {lm}) imports scorekit.{t} (layer {lt})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    edges = _edges()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(edges.get(v, ())):
            if state.get(w) == 1:
                return [*path[path.index(w) :], w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state:
            cycle = visit(v)
            assert cycle is None, "import cycle: " + " -> ".join(f"scorekit.{m}" for m in cycle)


def test_the_checker_sees_a_violation():
    # The checker itself must be able to fail: an upward import and a lazy one are both caught.
    src = "def f():\n    from scorekit.cli import main\n"
    tree = ast.parse(src)
    node = tree.body[0].body[0]
    assert isinstance(node, ast.ImportFrom) and _resolve(node.module) == "cli"
    assert _layer("cli") > _layer("samplers")


def test_submodules_load_on_attribute_access():
    public = {m.split(".")[0] for m in MODULES if m and not m.split(".")[0].startswith("_")}
    assert set(scorekit.SUBMODULES) == public
    code = (
        "import scorekit, sys\n"
        "assert 'scorekit.samplers' not in sys.modules\n"
        "for name in scorekit.SUBMODULES:\n"
        "    assert getattr(scorekit, name).__name__ == 'scorekit.' + name\n"
        "assert callable(scorekit.sample) and 'euler' in scorekit.samplers.REGISTRY\n"
        "try:\n"
        "    scorekit.no_such_module\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_module' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["optimized"])
def test_moved_names_say_where_they_went(name):
    from scorekit import schedules

    with pytest.raises(AttributeError, match=f"scorekit.samplers.{name}"):
        getattr(schedules, name)
