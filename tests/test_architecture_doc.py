"""docs/ARCHITECTURE.md's module table names every module of the four packages, and only modules
that exist; the docs a user reads point at no document outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("device_profiles", "edge_sdk", "export", "coordinator")  # the dependency order
HEADER = "| package | module | one job |"
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _holds_logic(init: Path) -> bool:
    """An `__init__.py` needs a row only when it does more than re-export (docstring, imports,
    `__all__`)."""
    body = ast.parse(init.read_text()).body
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is body[0]:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        return True
    return False


def module_files() -> set[str]:
    files = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            if path.name == "__init__.py" and not _holds_logic(path):
                continue
            files.add(path.relative_to(ROOT).as_posix())
    return files


def table_rows() -> list[tuple[str, str, str]]:
    """(package, module cell, job cell) per row; an empty package cell continues the one above."""
    lines = ARCHITECTURE.read_text().splitlines()
    assert HEADER in lines, f"docs/ARCHITECTURE.md has no module table ({HEADER})"
    rows, package = [], None
    for line in lines[lines.index(HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 3, f"module table row without three cells: {line}"
        if cells[0]:
            package = cells[0].strip("`")
        assert package in PACKAGES, f"module table row of an unknown package {cells[0]!r}: {line}"
        rows.append((package, cells[1], cells[2]))
    return rows


def named_modules() -> dict[str, str]:
    """Every path the table names -> the row naming it. A row for a sub-package (`protocol/`)
    names the modules its text lists in backticks (`envelope.py`); a repository path in any text
    (`edge_sdk/runtime/backends.py`) is named too."""
    named = {}
    for package, module_cell, job in table_rows():
        names = re.findall(r"`([^`]+)`", module_cell)
        assert names, f"module table row names no module: {module_cell!r}"
        for name in names:
            named[f"{package}/{name}"] = module_cell
            if name.endswith("/"):
                for module in re.findall(r"`(\w+\.py)`", job):
                    named[f"{package}/{name}{module}"] = module_cell
        for path in re.findall(r"`((?:%s)/[\w/]+\.py)`" % "|".join(PACKAGES), job):
            named[path] = module_cell
    return named


def test_every_module_has_a_row():
    named = named_modules()
    missing = sorted(module_files() - set(named))
    assert not missing, f"modules without a row in docs/ARCHITECTURE.md's module table: {missing}"


def test_every_module_the_table_names_exists():
    stale = []
    for path, row in named_modules().items():
        target = ROOT / path
        exists = (target / "__init__.py").is_file() if path.endswith("/") else target.is_file()
        if not exists:
            stale.append(f"{path} (row {row})")
    assert not stale, f"docs/ARCHITECTURE.md's module table names modules that do not exist: {stale}"


def test_rows_are_grouped_by_package_in_dependency_order():
    order = []
    for package, _, _ in table_rows():
        if not order or order[-1] != package:
            order.append(package)
    assert order == list(PACKAGES), f"module table groups {order}, expected {list(PACKAGES)}"


def test_the_table_pins_what_the_brief_names():
    """The rows a reorganisation moved: nothing names a module by its old name."""
    named = named_modules()
    for path in ("edge_sdk/sizing.py", "coordinator/slicing.py", "coordinator/service/states.py",
                 "export/formats.py", "edge_sdk/settings.py", "edge_sdk/plan_features.py",
                 "device_profiles/readers.py", "device_profiles/throughput.py",
                 "device_profiles/network.py"):
        assert path in named
    table = ARCHITECTURE.read_text().split(HEADER)[1].split("\n\n")[0]
    assert "budget.py" not in table and "fedprune edge" not in table


# Documents: a file path ending in one of these is a document reference.
DOC_SUFFIXES = ("md", "rst", "pdf", "ipynb", "tex")
OUTSIDE = [
    (re.compile(r"RESEARCH\.md"), "a research digest that is not in the repository"),
    (re.compile(r"shared/docs"), "documents in the shared folder beside the repository"),
    (re.compile(r"(?<![\w-])seeds/"), "seed material that is not in the repository"),
    (re.compile(r"\.\./shared/(?!data\b)"), "the shared folder beside the repository (only "
                                            "../shared/data, a data directory, is a runtime path)"),
]


def _resolves(doc: Path, reference: str) -> bool:
    path = reference.split("#", 1)[0]
    for base in (doc.parent, ROOT):
        target = (base / path).resolve()
        if target.is_file() and target.is_relative_to(ROOT):
            return True
    return False


def test_no_doc_references_documents_outside_the_repository():
    problems = []
    for doc in USER_DOCS:
        text = doc.read_text()
        name = doc.relative_to(ROOT).as_posix()
        for pattern, why in OUTSIDE:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{name}:{line}: {match.group(0)!r}: {why}")
        text_without_urls = re.sub(r"[a-z]+://\S+", "", text)
        for match in re.finditer(r"[\w./-]*\w\.(?:%s)\b(?:#[\w-]+)?" % "|".join(DOC_SUFFIXES),
                                 text_without_urls):
            if not _resolves(doc, match.group(0)):
                line = text_without_urls.count("\n", 0, match.start()) + 1
                problems.append(f"{name}:{line}: {match.group(0)!r} is not a file of the repository")
        for target in re.findall(r"\]\(([^)\s]+)\)", text_without_urls):
            if not target.startswith("#") and not _resolves(doc, target):
                problems.append(f"{name}: link to {target!r}, not a file of the repository")
    assert not problems, "\n".join(problems)


def test_the_outside_reference_check_catches_what_it_should():
    samples = ["see RESEARCH.md", "../shared/docs/notes.md", "seeds/fedp3.md", "../shared/papers/x"]
    for sample in samples:
        assert any(pattern.search(sample) for pattern, _ in OUTSIDE), sample
    assert not any(pattern.search("else `../shared/data` when it exists") for pattern, _ in OUTSIDE)
    assert not _resolves(ARCHITECTURE, "NOTES-NOT-HERE.md")
    assert _resolves(ARCHITECTURE, "BENCHMARKS.md") and _resolves(ROOT / "README.md", "docs/PROTOCOL.md#payload")
