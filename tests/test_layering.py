"""The dependency direction of docs/design.md, checked on every import statement of the package.

Each package of vjax may import only the packages listed for it (module-level and function-level imports
alike): ``layers`` nothing but other layers and the leaf ``vjax.pytree``, ``models`` only ``layers``, ``data`` and ``train`` no model.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

ALLOWED = {
    "vjax.layers": {"vjax.pytree"},  # the leaf utility of path-keyed parameter dicts (imports nothing from vjax)
    "vjax.models": {"vjax.layers"},
    "vjax.data": {"vjax.layers"},
    "vjax.train": {"vjax.layers", "vjax.pytree"},
    "vjax.generate": {"vjax.layers", "vjax.models"},
    "vjax.convert": {"vjax.layers", "vjax.models", "vjax.pytree"},
}


def group(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vjax":
        return None
    return ".".join(parts[:2])


def imports_of(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_group_of_a_module():
    assert group("vjax.layers.attention") == "vjax.layers" and group("vjax.eval") == "vjax.eval"
    assert group("jax.numpy") is None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    base = ROOT / package.replace(".", "/")
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    assert files, package
    wrong = []
    for f in files:
        for module in imports_of(f):
            target = group(module)
            if target and target != package and target not in ALLOWED[package]:
                wrong.append(f"{f.relative_to(ROOT)} imports {module}")
    assert not wrong, "imports against docs/design.md's direction:\n" + "\n".join(wrong)
