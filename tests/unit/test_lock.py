"""scripts/constraints.txt: every install (`make`, the Docker images) takes its versions from it,
so it must pin every dependency the project and the client declare, within their ranges, and be
what this environment runs (the tests pass with those versions, or the file is stale)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
UNPINNED = {"torch"}  # its build differs by machine: the Makefile and the Dockerfile pin its release


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "scripts/constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
        assert match, f"not a plain pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = match[2]
    return pins


def _declared() -> list[Requirement]:
    out = []
    for path in (ROOT / "pyproject.toml", ROOT / "clients/python/pyproject.toml"):
        project = tomllib.loads(path.read_text())["project"]
        out += [Requirement(r) for r in project["dependencies"]]
        for extra in project.get("optional-dependencies", {}).values():
            out += [Requirement(r) for r in extra]
    return out


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    problems = []
    for req in _declared():
        name = canonicalize_name(req.name)
        if name in UNPINNED:
            assert name not in pins, f"{name} must not be pinned (see scripts/lock.sh)"
            continue
        if name not in pins:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} does not allow the pinned {pins[name]}")
    assert not problems, "run `make lock` after installing: " + "; ".join(problems)


def test_this_environment_runs_the_pinned_versions() -> None:
    """`make` installs with the constraints; a package upgraded by hand since is what the tests
    then ran with, and the file no longer says so."""
    stale = []
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            stale.append(f"{name}=={version} is not installed")
            continue
        if installed != version:
            stale.append(f"{name} is {installed}, pinned {version}")
    assert not stale, "run `make lock` (or reinstall with `make venv`): " + "; ".join(stale)


def test_installs_use_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[worker,dev]' -c scripts/constraints.txt" in makefile
    assert "-e ./clients/python -c scripts/constraints.txt" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install -r /tmp/requirements.txt(.*)", dockerfile)
    assert len(installs) == 3 and all("-c constraints.txt" in rest for rest in installs), installs
