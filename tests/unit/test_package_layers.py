"""The layout shows the architecture: embserve's subsystems import only the ones below them, so that the API's
contracts never pull in the engine (or torch), and the launcher is the only part that knows about processes."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lowest first. deployments/ is the Ray wiring over all of them.
LAYERS = ("settings", "api", "metrics", "engine", "bulk", "launch", "deployments")


def unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "deployments":
        return "deployments"
    return parts[1] if parts[0] == "embserve" and len(parts) > 1 and parts[1] in LAYERS else None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module in ("embserve", "deployments"):  # `from embserve import settings`
                found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def arrows() -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> the files that import across, lazily imported modules included."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in [*(ROOT / "embserve").rglob("*.py"), *(ROOT / "deployments").glob("*.py")]:
        me = unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in imports(path):
            other = unit(module)
            if me and other and other != me:
                found.setdefault((me, other), set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_no_subsystem_imports_one_above_it():
    upward = {pair: files for pair, files in arrows().items() if LAYERS.index(pair[1]) > LAYERS.index(pair[0])}
    assert upward == {}


def test_every_module_of_embserve_belongs_to_a_subsystem():
    loose = {p.name for p in (ROOT / "embserve").glob("*.py")} - {"__init__.py", "settings.py"}
    packages = {p.name for p in (ROOT / "embserve").iterdir() if (p / "__init__.py").exists()}
    assert loose == set() and packages == set(LAYERS) - {"settings", "deployments"}


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk reads lazy imports inside functions too, and names the file."""
    (tmp_path / "embserve" / "api").mkdir(parents=True)
    (tmp_path / "embserve" / "api" / "x.py").write_text("def f():\n    from embserve.engine import model\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert arrows() == {("api", "engine"): {"embserve/api/x.py"}}
