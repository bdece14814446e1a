"""Dependencies run one way: scaler_cli -> studies -> trainers -> scaler. A lower layer importing a
higher one (even lazily, inside a function) fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["scaler", "trainers", "studies", "scaler_cli"]  # bottom to top


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", [name for name in LAYERS if (ROOT / name).is_dir()])
def test_no_layer_imports_a_higher_one(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1 :])
    offenders = {
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(imported_packages(path) & higher))}"
        for path in (ROOT / layer).rglob("*.py")
        if imported_packages(path) & higher
    }
    assert not offenders, sorted(offenders)


def test_the_checker_sees_lazy_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from trainers.run import train\n    import scaler_cli.app\n")
    assert imported_packages(path) == {"trainers", "scaler_cli"}
