"""The house's floors: cli → flows → tasks → minitron, with infra beside tasks. Every import in the source (at the
top of a module or inside a function) may reach its own package or a floor below, never one above; minitron, the
floor torchrun and Ray workers import, never reaches prefect, mlflow or boto3 either. Beside: a task may use the
stack's names and HTTP/auth helpers (infra/stack.py, stdlib only), infra never imports a task."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"minitron": 0, "tasks": 1, "infra": 1, "flows": 2, "cli": 3}
BESIDE = {("tasks", "infra")}  # (importer, imported) on one floor that may meet
SERVICES = {"prefect", "mlflow", "boto3"}  # the orchestration and tracking clients: never in the algorithms


def imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def upward_imports() -> list[str]:
    bad = []
    for package, floor in FLOOR.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(imports(path)):
                if name in FLOOR and name != package and FLOOR[name] >= floor and (package, name) not in BESIDE:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
                if package == "minitron" and name in SERVICES:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_imports_run_down_the_floors_only():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a minitron module importing the CLI (at function level) or infra importing a task
    is reported."""
    import tests.test_layout as layout

    for package in FLOOR:
        (tmp_path / package).mkdir()
    (tmp_path / "minitron" / "a.py").write_text("def f():\n    from cli.main import main\n    import mlflow\n")
    (tmp_path / "infra" / "b.py").write_text("import tasks.storage\nfrom minitron import config\n")
    monkeypatch.setattr(layout, "ROOT", tmp_path)
    assert layout.upward_imports() == ["minitron/a.py imports cli", "minitron/a.py imports mlflow",
                                       "infra/b.py imports tasks"]


def test_only_the_worker_parses_a_command_line_in_minitron():
    """minitron/ is the workers' package: its one command line is `python -m minitron.distill.worker JOB.json`."""
    parsers = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "minitron").rglob("*.py"))
               if "argparse" in imports(p) or "__main__" in p.read_text()]
    assert parsers == ["minitron/distill/worker.py"]


def test_every_floor_is_packaged_and_copied_into_the_image():
    """The wheel's package list and the image's COPY lines name every floor (a floor left out imports nowhere)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(p.rstrip("*") for p in include["include"]) == sorted(FLOOR)
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert all(f"COPY {p} ./{p}\n" in dockerfile for p in FLOOR)
