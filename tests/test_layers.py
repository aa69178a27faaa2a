"""The import graph keeps the layers honest (DESIGN.md, "Layers"): shared machinery never imports an
application, applications never import each other, imports only point down, and no module reaches into
another module's private names. Read from the exported source with `ast`, so nothing is imported."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "coursekit"
APPLICATIONS = ("vision", "text", "tabular")
NOTEBOOK_FACING = {"coursekit.all"}  # the one star-import module: it gathers everything on purpose
# Shared machinery, lowest first: a module may import only modules of a strictly lower rank.
SHARED_RANK = {"coursekit.core": 0, "coursekit.from_fastai": 0, "coursekit.losses": 1, "coursekit.schedule": 1,
               "coursekit.metrics": 1, "coursekit.doctor": 1, "coursekit.distributed": 1,
               "coursekit.data.external": 1, "coursekit.cli": 1, "coursekit.data.core": 2, "coursekit.persist": 3,
               "coursekit.learner": 4, "coursekit.callbacks": 5, "coursekit.interpret": 5}


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py")) if f.name != "_modidx.py"}


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    "The absolute module name an `import`/`from ... import` statement refers to."
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, file: Path) -> list:
    "Every (imported module, imported names) pair in `file`, including imports inside functions."
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, file.name == "__init__.py", node)
            found.append((target, [alias.name for alias in node.names]))
    return [(target, names) for target, names in found if target.split(".")[0] == "coursekit"]


def owning_module(target: str, names: list, known: dict) -> list:
    "`from coursekit.vision import data` names a module: return the modules really imported."
    submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return submodules or [target]


def domain(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in APPLICATIONS else None


def import_edges() -> list:
    known = modules()
    edges = []
    for name, file in known.items():
        for target, names in imports_of(name, file):
            for imported in owning_module(target, names, known):
                edges.append((name, imported, names))
    return edges


def edge_params() -> list:
    return [pytest.param(*edge, id=f"{edge[0]}->{edge[1]}") for edge in import_edges()]


def test_the_package_is_found():
    found = modules()
    assert "coursekit.learner" in found and "coursekit.core" in found, f"package not found under {PACKAGE}"
    assert all(any(domain(n) == d for n in found) for d in APPLICATIONS), "every application has a package"


def test_every_shared_module_has_a_rank():
    shared = [n for n in modules() if domain(n) is None and n not in NOTEBOOK_FACING
              and n not in ("coursekit", "coursekit.data")]
    unranked = [n for n in shared if n not in SHARED_RANK]
    assert not unranked, f"give these shared modules a rank in SHARED_RANK (and a place in DESIGN's layers): {unranked}"


@pytest.mark.parametrize("importer,imported,names", edge_params())
def test_imports_point_down(importer, imported, names):
    if importer in NOTEBOOK_FACING or imported in ("coursekit", "coursekit.data", "coursekit.vision",
                                                   "coursekit.text", "coursekit.tabular"):
        return
    if domain(importer) is None:
        assert domain(imported) is None, f"{importer} (shared machinery) imports the application module {imported}"
        assert SHARED_RANK[imported] < SHARED_RANK[importer], \
            f"{importer} (rank {SHARED_RANK[importer]}) imports {imported} (rank {SHARED_RANK[imported]}): imports point down"
    else:
        assert domain(imported) in (None, domain(importer)), \
            f"{importer} imports {imported}: applications never import each other"
        assert imported not in NOTEBOOK_FACING, f"{importer} imports the notebook-facing {imported}"


@pytest.mark.parametrize("importer,imported,names", edge_params())
def test_no_private_names_from_other_modules(importer, imported, names):
    private = [n for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, f"{importer} imports private names {private} from {imported}: make them public or move them"


def test_no_import_cycles_inside_an_application():
    graph = {}
    for importer, imported, _ in import_edges():
        if domain(importer) and domain(importer) == domain(imported) and importer != imported:
            graph.setdefault(importer, set()).add(imported)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))
    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycles through {cycles}"
