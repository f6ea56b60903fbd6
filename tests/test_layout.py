"""The README's "Layout" table is the import rule of the project, and the code follows it.

Each project file (outside tests/, benchmarks/, scripts/) must have a row; each row's "may import" cell bounds
the project modules that file imports (at any depth of the file, lazy imports included); the import graph has
no cycles; evaluate.py reaches pretrain.py by no path.
"""

import ast
import itertools
import re
from pathlib import Path

from tests.helpers import REPO

TOP_LEVEL = ("models", "dataset", "utils", "training", "evaluators", "tools", "puzzle_dataset", "pretrain", "evaluate")
FREE = ("tests", "benchmarks", "scripts", ".venv", "build")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    return sorted(
        p
        for p in REPO.rglob("*.py")
        if p.relative_to(REPO).parts[0] not in FREE and p.relative_to(REPO).parts[0].split(".")[0] in TOP_LEVEL
    )


def imports_of(path: Path) -> set[str]:
    """Project modules imported anywhere in `path` (`from utils import x` counts as `utils.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in TOP_LEVEL}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in TOP_LEVEL:
                continue
            if node.module in ("models", "dataset", "utils", "training", "evaluators", "tools"):
                found |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def expand(pattern: str) -> list[str]:
    """`dataset/build_{a,b}_dataset.py` → both paths."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    return list(
        itertools.chain.from_iterable(
            expand(pattern[: m.start()] + alt + pattern[m.end() :]) for alt in m.group(1).split(",")
        )
    )


def layout_rules() -> dict[str, tuple[str, list[str]]]:
    """file path → (kind, prefixes): kind 'only' (imports within prefixes), 'but' (anything except), 'none'."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        files = [f for name in re.findall(r"`([^`]+)`", cells[0]) for f in expand(name)]
        allowed = re.findall(r"`([^`]+)`", cells[2])
        if cells[2].startswith("anything but"):
            rule = ("but", allowed)
        elif cells[2] == "—":
            rule = ("none", [])
        else:
            rule = ("only", allowed)
        for f in files:
            rules[f] = rule
    return rules


def within(module: str, prefixes: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_project_file_has_a_layout_row_and_every_row_a_file():
    rules = layout_rules()
    files = {str(p.relative_to(REPO)) for p in project_files() if p.name != "__init__.py"}
    assert sorted(files - set(rules)) == [], "files missing from README 'Layout'"
    assert sorted(set(rules) - files) == [], "README 'Layout' rows without a file"


def test_imports_follow_the_layout_rules():
    rules = layout_rules()
    violations = []
    for path in project_files():
        rel = str(path.relative_to(REPO))
        if path.name == "__init__.py":
            continue
        kind, prefixes = rules[rel]
        own = module_name(path)
        for imported in sorted(imports_of(path)):
            if imported == own:
                continue
            if kind == "only":
                ok = within(imported, prefixes)
            elif kind == "but":
                ok = not within(imported, prefixes)
            else:  # "—": no project imports at all
                ok = False
            if not ok:
                violations.append(f"{rel} imports {imported} ({kind} {prefixes})")
    assert violations == []


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in project_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # `from utils import checkpointing` names a module; `from utils.x import f` names utils.x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and modules[imported].name != "__init__.py":
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_import_cycles_and_evaluate_never_reaches_pretrain():
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reachable(name))
    assert cycles == []
    assert "pretrain" not in reachable("evaluate")
    assert "training.train_step" in reachable("pretrain")  # the graph is real: the loop reaches its step


def test_pretrain_keeps_the_reference_names_and_stays_short():
    import pretrain

    for name in ("PretrainConfig", "create_dataloader", "init_train_state", "train_batch", "evaluate"):
        assert callable(getattr(pretrain, name)), name
    assert callable(pretrain.save_train_state) and callable(pretrain.launch)
    assert len((REPO / "pretrain.py").read_text(encoding="utf-8").splitlines()) <= 520
