"""The package's import graph keeps its plan (docs/ARCHITECTURE.md).

Read from the source with ``ast`` (imports inside functions included, so a cycle cannot hide
behind a lazy import): no cycle; the ensemble/report/artifacts side never reaches torch, the
models, the training loop or the CPU members (a blend of saved OOF files starts in well under
a second and runs where torch is not installed); the data layer never reaches models,
training or blending; no stage imports the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmfold"
HEAVY = ("torch", "torchvision", "timm", "transformers", "accelerate")
# side -> what it may never import, directly or through any mmfold module it imports
RULES: dict[str, tuple[str, ...]] = {
    "mmfold.ensemble": ("mmfold.models", "mmfold.train", "mmfold.cpu", "mmfold.studies", *HEAVY),
    "mmfold.report": ("mmfold.models", "mmfold.train", "mmfold.cpu", "mmfold.studies", *HEAVY),
    "mmfold.artifacts": ("mmfold.models", "mmfold.train", "mmfold.cpu", "mmfold.ensemble", *HEAVY),
    "mmfold.data": ("mmfold.models", "mmfold.train", "mmfold.cpu", "mmfold.ensemble", "mmfold.report",
                    "mmfold.studies", *HEAVY),
}


def module_name(path: Path, root: Path) -> str:
    """``src/mmfold/ensemble/blend.py`` -> ``mmfold.ensemble.blend``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports anywhere in its body (absolute names; submodules named
    in ``from pkg import mod`` resolved), mmfold's and third-party top-level packages alike."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return {m for m in out if m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> modules it imports (mmfold modules, plus third-party top-level names).

    Package ``__init__`` modules that a ``from pkg import sub`` merely passes through are not
    edges: an empty ``__init__`` imports nothing."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        deps = imports_of(path, name, known)
        graph[name] = {d for d in deps if d in known or d.split(".")[0] != root.name}
        graph[name] -= {d for d in graph[name] if d in known and files[d].name == "__init__.py"
                        and not files[d].read_text(encoding="utf-8").count("import")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's modules, or None."""
    state: dict[str, int] = {}

    def visit(u: str, stack: list[str]) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if v not in graph:
                continue
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (found := visit(v, stack)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if not state.get(u) and (found := visit(u, [])):
            return found
    return None


def reach(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Everything ``start`` imports transitively, each with the chain that leads there."""
    seen, todo = {start: [start]}, [start]
    while todo:
        u = todo.pop()
        for v in graph.get(u, ()):
            if v not in seen:
                seen[v] = seen[u] + [v]
                todo.append(v)
    return seen


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, as 'module reaches forbidden via a -> b -> c'."""
    out = []
    for side, banned in RULES.items():
        for mod in sorted(m for m in graph if m == side or m.startswith(side + ".")):
            for target, chain in reach(graph, mod).items():
                if any(target == b or target.startswith(b + ".") for b in banned):
                    out.append(f"{mod} reaches {target} via {' -> '.join(chain)}")
    for mod, deps in graph.items():
        if "mmfold.cli" in deps and mod != "mmfold.__main__":
            out.append(f"{mod} imports the CLI")
    return out


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_layers_are_respected() -> None:
    assert violations(import_graph()) == []


def test_the_checker_catches_a_forbidden_import_and_a_cycle(tmp_path: Path) -> None:
    """Without this, the two tests above could pass by seeing nothing."""
    pkg = tmp_path / "mmfold"
    for rel, body in {
        "__init__.py": "",
        "cli.py": "",
        "ensemble/__init__.py": "",
        "ensemble/blend.py": "def run():\n    from mmfold.train import loop\n",
        "train/__init__.py": "",
        "train/loop.py": "import torch\nfrom mmfold.data import competition\n",
        "data/__init__.py": "",
        "data/competition.py": "def f():\n    from mmfold.data import folds\n",
        "data/folds.py": "from mmfold.data.competition import f\nfrom mmfold import cli\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(body)
    graph = import_graph(pkg)
    assert find_cycle(graph) in (["mmfold.data.competition", "mmfold.data.folds", "mmfold.data.competition"],
                                 ["mmfold.data.folds", "mmfold.data.competition", "mmfold.data.folds"])
    found = "\n".join(violations(graph))
    assert "mmfold.ensemble.blend reaches mmfold.train.loop" in found
    assert "mmfold.ensemble.blend reaches torch via mmfold.ensemble.blend -> mmfold.train.loop -> torch" in found
    assert "mmfold.data.folds imports the CLI" in found


@pytest.mark.slow
def test_a_blend_of_saved_oof_files_never_imports_torch(project: Path) -> None:
    """The claim checked on the running program, not only on the source."""
    from tests.conftest import write_competition

    write_competition(project)
    run = lambda code: subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=project,  # noqa: E731
                                      capture_output=True, text=True, timeout=300)
    trained = run("""
        from mmfold.cli import main
        assert main(["folds", "--data", "tiny"]) == 0
        assert main(["train", "--data", "tiny", "--model", "tfidf_lr"]) == 0
    """)
    assert trained.returncode == 0, trained.stderr
    blended = run("""
        import sys
        from mmfold.cli import main
        assert main(["blend", "--data", "tiny", "--models", "tfidf_lr", "--name", "x", "blend.method=mean"]) == 0
        assert main(["report", "--data", "tiny"]) == 0
        print("heavy:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "transformers")))
    """)
    assert blended.returncode == 0, blended.stderr
    assert "heavy: []" in blended.stdout
