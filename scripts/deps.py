"""Print the project's dependencies (and those of the extras named) from pyproject.toml, one per
line, for `pip install -r`: the Docker images install them in a layer of their own, before the
source is copied, so that a code change does not reinstall them.

    python deps.py [EXTRA ...] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def dependencies(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"deps.py: no such extra in {pyproject}: {', '.join(unknown)}")
    out: list[str] = []
    for requirement in [*project["dependencies"], *(r for e in extras for r in optional[e])]:
        if requirement not in out:
            out.append(requirement)
    return out


if __name__ == "__main__":
    here = Path.cwd() / "pyproject.toml"
    print("\n".join(dependencies(here, sys.argv[1:])))
