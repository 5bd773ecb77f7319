"""The package's layers, as the tree shows them: a lower layer never imports a higher one, and only the Ray layers
import Ray. Checked on the source (every import statement, those inside functions included), so a lazy import that
breaks the rule fails here as well as one at the top of a module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bict_ray"

# layer -> rank; a module may import its own layer and lower ranks only. core and retrieval are siblings: the
# method in torch, retrieval on arrays; neither needs the other. The config sits above them: it checks its choices
# against the lists they define (core takes config objects, and imports their classes only for type checking).
LAYERS = {"base": 0, "core": 1, "retrieval": 1, "config": 2, "storage": 3, "distributed": 4, "pipeline": 5, "cli": 6}
SIBLINGS = {frozenset({"core", "retrieval"})}
RAY_LAYERS = {"distributed", "pipeline", "cli"}
# third-party imports a layer must not need (retrieval works on arrays: no models)
FORBIDDEN = {"retrieval": {"torchvision"}}


def layer_of(module: str) -> str:
    """``bict_ray.core.models`` -> core; modules at the package's top (errors, presets) are the base."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "cli"
    if module == "bict_ray.config":
        return "config"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "base"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, but those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "bict_ray":
                # `from bict_ray import x`: x is a submodule or a name of the package's own API
                found += [(node.lineno, f"bict_ray.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        layer = layer_of(name)
        if name == "bict_ray":
            continue  # the public API: re-exports every layer lazily (checked by test_import_has_no_ray)
        for line, target in imports_of(path, root):
            top = target.split(".")[0]
            where = f"{path.relative_to(root.parent)}:{line}"
            if top == "ray" and layer not in RAY_LAYERS:
                problems.append(f"{where}: {layer} imports ray ({target})")
            if top in FORBIDDEN.get(layer, ()):
                problems.append(f"{where}: {layer} imports {target}")
            if top != "bict_ray" or target == "bict_ray":
                continue
            other = layer_of(target)
            if target in {"bict_ray.__main__"}:
                other = "cli"
            higher = LAYERS[other] > LAYERS[layer]
            sideways = other != layer and frozenset({other, layer}) in SIBLINGS
            if higher or sideways:
                problems.append(f"{where}: {layer} imports {other} ({target})")
    return problems


def test_no_layer_imports_a_higher_one_or_ray_outside_the_ray_layers():
    assert violations() == []


def test_the_layer_check_catches_a_core_module_importing_ray_and_a_higher_layer(tmp_path):
    fake = tmp_path / "bict_ray"
    (fake / "core").mkdir(parents=True)
    (fake / "retrieval").mkdir()
    (fake / "core" / "models.py").write_text("def f():\n    import ray\n    from bict_ray.pipeline import sequence\n"
                                             "from bict_ray.config import Config\n")
    (fake / "retrieval" / "search.py").write_text("from ..core.models import f\nimport torchvision\n")
    found = violations(fake)
    assert any("core imports ray" in p for p in found)
    assert any("core imports pipeline" in p for p in found)
    assert any("core imports config" in p for p in found)
    assert any("retrieval imports core" in p for p in found)
    assert any("retrieval imports torchvision" in p for p in found)


def test_import_has_no_ray():
    """A notebook imports the API without a cluster: neither `import bict_ray` nor the in-memory names start Ray."""
    code = ("import sys, bict_ray\n"
            "from bict_ray import retrieval_metrics, upgrade_embeddings, UpgradeTransform, load_config\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("layer", sorted(set(LAYERS) - {"base", "config"}))
def test_each_layer_is_a_package_with_a_docstring(layer):
    init = PACKAGE / layer / "__init__.py"
    assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{layer}/ needs an __init__ docstring"
