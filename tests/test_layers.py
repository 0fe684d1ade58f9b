"""The package's layers: imports run one way, from higher layers to lower ones (docs/ARCHITECTURE.md).

Every import of a sam2_fast module in sam2_fast/ and kernels/ (installed as sam2_fast.kernels), at module level or
inside a function, is read from the source with ``ast`` and checked against the layer table below."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import its own layer and those below it.
LAYERS = ["io", "backends", "ops", "gemm", "model", "deploy", "testing", "apps", "package"]
# Layers that sit side by side: neither imports the other.
SIBLINGS = {frozenset({"deploy", "testing"})}


def _layer(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "sam2_fast", module
    if len(parts) == 1 or parts[1] in ("__main__", "embed", "__init__"):
        return "package"  # the public API and the documented entry points at the top
    if parts[1] in ("kernels", "_C"):
        return "backends"
    if parts[1] == "_version":
        return LAYERS[0]
    assert parts[1] in LAYERS, f"{module} is in no layer: add its folder to LAYERS"
    return parts[1]


def _modules():
    for path in sorted((ROOT / "sam2_fast").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        yield path, parts
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        yield path, ["sam2_fast", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]


def _imports(path: Path, parts: list):
    """(line, absolute module) of every sam2_fast import in the file."""
    package = parts[:-1]  # a module's package; a package's __init__ is its own package
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sam2_fast":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "sam2_fast":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule's layer
                candidate = f"{module}.{alias.name}"
                yield node.lineno, candidate if _is_module(candidate) else module


def _is_module(module: str) -> bool:
    parts = module.split(".")
    if parts[:2] == ["sam2_fast", "kernels"]:
        base = ROOT / "kernels" / Path(*parts[2:]) if parts[2:] else ROOT / "kernels"
    else:
        base = ROOT / Path(*parts)
    if parts[-1] == "_C":  # the C++ extension (a shared library; absent where it was not built)
        return True
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _violations():
    found = []
    for path, parts in _modules():
        own = _layer(".".join(parts))
        for line, module in _imports(path, parts):
            other = _layer(module)
            if frozenset({own, other}) in SIBLINGS or LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {module} ({other})")
    return found


def test_imports_run_from_higher_layers_to_lower():
    assert not _violations(), "imports reaching up a layer:\n  " + "\n  ".join(_violations())


def test_the_check_sees_an_import_that_reaches_up(tmp_path, monkeypatch):
    # A module of the lowest layer importing the model must be reported.
    fake = tmp_path / "sam2_fast" / "io"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..model import hiera\n\ndef f():\n    import sam2_fast.apps.cli\n")
    found = [module for _, module in _imports(fake / "bad.py", ["sam2_fast", "io", "bad"])]
    assert found == ["sam2_fast.model.hiera", "sam2_fast.apps.cli"]
    assert all(LAYERS.index(_layer(module)) > LAYERS.index("io") for module in found)


@pytest.mark.parametrize("module", ["sam2_fast", "sam2_fast.model.hiera", "sam2_fast.kernels.launch"])
def test_every_module_has_a_layer(module):
    assert _layer(module) in LAYERS
