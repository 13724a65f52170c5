"""The project's imports run one way, lazily imported modules included: nothing imports a module
of its own level or above (the README's reading order)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {  # a module may import only project modules of a lower level
    "quant": -1, "tokenizer": -1, "llama_files": -1,  # below model.py's loader: it quantizes, reads the tokenizer and the files
    "model": 0, "clip": 0, "router": 0, "runtime": 0, "curves": 0,
    "adapter": 1,
    "lavin": 2,
    "data": 3,  # the data package: its modules may import one another
    "generate": 4,
    "evaluate": 5,
    "config": 6, "checkpoint": 6,
    "train": 7, "sample": 7,
    "benchmarks": 8, "demo": 8,  # benchmarks: the package, its modules may import one another
    "bench": 9, "docs": 9,  # docs/screenshot.py: the README's picture of demo.py's page
}


def project_imports(path: Path) -> set[str]:
    """Top-level project modules that the file imports anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(LEVELS)
    return found


def level_of(path: Path) -> tuple[str, int]:
    name = path.relative_to(ROOT).parts[0].removesuffix(".py")
    return name, LEVELS[name]


FILES = sorted([*ROOT.glob("*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("docs/*.py")])


def test_every_module_has_a_level():
    assert {level_of(f)[0] for f in FILES} == set(LEVELS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    name, level = level_of(path)
    wrong = sorted(m for m in project_imports(path) if m != name and LEVELS[m] >= level)
    assert not wrong, f"{path.relative_to(ROOT)} (level {level}) imports {wrong}, which are not below it"


def test_the_check_sees_a_lazy_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from train import main\n    import sample.x\n")
    assert project_imports(bad) == {"train", "sample"}
