"""The Python client is a distribution of its own (clients/python): its wheel holds one package,
the `imagegen` command, and the three dependencies the client imports; nothing of the server."""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.imports import imported_modules

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
SERVER_PACKAGES = {"app", "worker", "models", "bench", "tests"}


def _declared() -> set[str]:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}


def test_the_wheel_holds_the_client_alone(tmp_path: Path) -> None:
    source = tmp_path / "src"  # built from a copy: the build writes build/ and egg-info next to it
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), source],
        check=True,
    )
    (wheel,) = tmp_path.glob("imagegen_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"imagegen_client"}
    assert {"imagegen_client/client.py", "imagegen_client/cli.py", "imagegen_client/__main__.py"} <= set(names)
    assert "imagegen_client/py.typed" in names  # PEP 561: type checkers read the client's annotations
    assert {canonicalize_name(Requirement(r).name) for r in requires} == {"httpx", "httpx-sse", "tqdm"}
    assert "imagegen = imagegen_client.cli:main" in entry_points


def test_the_client_imports_only_what_it_declares() -> None:
    by_module = md.packages_distributions()
    declared = _declared()
    seen: set[str] = set()
    for path in (CLIENT / "imagegen_client").glob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in SERVER_PACKAGES, f"{path.name} imports {name} from the server"
            if top in sys.stdlib_module_names or top == "imagegen_client":
                continue
            dists = {canonicalize_name(d) for d in by_module.get(top, [])}
            assert dists & declared, f"{path.name} imports {name}, which clients/python does not declare"
            seen |= dists & declared
    assert seen == declared  # and declares nothing it never imports


def test_the_server_distribution_leaves_the_client_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any("imagegen_client" in p for p in project["tool"]["setuptools"]["packages"]["find"]["include"])
    assert "scripts" not in project["project"]  # the `imagegen` command is the client's
    assert not (ROOT / "imagegen_client").exists()
