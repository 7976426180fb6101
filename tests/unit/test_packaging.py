"""The distribution installs one import name, `docqueue`, with every package folder and the
files the code reads at run time (the wheel itself is built and run in
tests/integration/test_wheel.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"docqueue": "docqueue", "models": "docqueue.models", "tasks": "docqueue.tasks",
           "workers": "docqueue.workers"}


def setuptools_config() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"])


def test_every_package_folder_is_installed_under_docqueue() -> None:
    # Given every folder with an __init__.py under the installed top-level folders
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    # Then pyproject lists exactly those, and maps each top folder under `docqueue`
    config = setuptools_config()
    assert set(config["packages"]) == found  # type: ignore[call-overload]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}


def test_the_files_read_at_run_time_are_package_data() -> None:
    # Given the patterns of package data
    data = setuptools_config()["package-data"]
    assert isinstance(data, dict)
    listed = {(ROOT / {v: k for k, v in FOLDERS.items()}[pkg]).glob(pattern).__next__().parent
              for pkg, patterns in data.items() for pattern in patterns}
    # Then the Lua scripts, the migration template and the demo corpus are among them
    for needed in ("workers/provider/lua", "models/migrations", "workers/local/corpus"):
        assert ROOT / needed in listed, needed


def test_the_type_checker_sees_the_installed_layout() -> None:
    # Given the folders pyproject installs under `docqueue`
    mapped = setuptools_config()["package-dir"]
    assert isinstance(mapped, dict)
    # When mypy looks them up through .typecheck (pyproject's [tool.mypy] mypy_path)
    tree = ROOT / ".typecheck" / "docqueue"
    # Then each one is linked in its installed place, the package's own files included
    for package, folder in mapped.items():
        if package == "docqueue":
            for name in ("__init__.py", "py.typed"):
                assert (tree / name).resolve() == (ROOT / folder / name).resolve(), name
        else:
            linked = tree / package.removeprefix("docqueue.")
            assert linked.resolve() == (ROOT / folder).resolve(), package
