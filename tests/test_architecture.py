"""The layering the README promises, checked on the source: pipeline/ is the library (no Prefect, no CLI, no
flows), benchmarks/ use only the library, and no module-level import cycle exists in pipeline/ or flows/."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not those imported inside functions or under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return names


def _sources(*folders: str) -> dict[str, Path]:
    return {_module_name(path): path for folder in folders for path in sorted((REPO / folder).rglob("*.py"))}


def test_the_library_imports_neither_the_wiring_nor_prefect_nor_the_cli():
    offending = {
        name: sorted(m for m in _top_level_imports(path) if m.split(".")[0] in ("flows", "prefect", "typer"))
        for name, path in _sources("pipeline").items()
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_benchmarks_use_the_library_not_the_wiring():
    offending = {
        name: sorted(m for m in _top_level_imports(path) if m.split(".")[0] == "flows")
        for name, path in _sources("benchmarks").items()
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_no_import_cycle_in_pipeline_or_flows():
    modules = _sources("pipeline", "flows")
    graph = {}
    for name, path in modules.items():
        # a module's own packages are initialised before it (Python imports parents first): not a cycle
        own = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        graph[name] = {imported for imported in _top_level_imports(path) if imported in modules and imported not in own | {name}}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as cycle:
        raise AssertionError(f"import cycle: {' → '.join(cycle.args[1])}") from None


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere: at the top, inside functions, under TYPE_CHECKING."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_configuration_owns_no_stage_and_preprocessing_reads_no_configuration():
    """config → data.preprocessing, one way: the preprocessing settings are defined where they are applied, and the
    configuration takes its types from there (not even a lazy import back)."""
    config = {m for m in _all_imports(REPO / "pipeline" / "config.py") if m.startswith("pipeline")}
    assert config <= {"pipeline.errors", "pipeline.data.preprocessing"}, config
    below = [REPO / "pipeline" / "data" / name for name in ("preprocessing.py", "images.py")]
    assert not any(m.startswith("pipeline.config") for path in below for m in _all_imports(path))
