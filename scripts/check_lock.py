"""Does requirements.lock satisfy pyproject.toml? ``python scripts/check_lock.py [pyproject.toml] [requirements.lock]``

pyproject.toml declares the ranges ssat works with; the lock holds the exact versions ``make install`` and CI
install. Every lock line must be one exact pin, and every requirement of the package and of each extra must be
pinned there inside its range, or the tested versions are not the ones the metadata promises. Exit code 1 lists
each problem on its own line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def read_lock(text: str) -> tuple[dict[str, Version], list[str]]:
    """The lock's pins by canonical name, and the lines that are not one exact pin (or pin a name twice)."""
    pins: dict[str, Version] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            problems.append(f"requirements.lock line {number}: {line!r} is not a requirement ({err})")
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.marker or req.extras:
            problems.append(f"requirements.lock line {number}: {line!r} is not one exact pin name==version")
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            problems.append(f"requirements.lock line {number}: {req.name} is pinned twice")
        pins[name] = Version(specs[0].version)
    return pins, problems


def declared(pyproject: dict) -> list[tuple[str, Requirement]]:
    """(where, requirement) for the dependencies and every extra's, without the package's references to itself."""
    project = pyproject["project"]
    found = [("the dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found += [(f"extra '{extra}'", Requirement(r)) for r in reqs]
    own = canonicalize_name(project["name"])
    return [(where, req) for where, req in found if canonicalize_name(req.name) != own]


def problems(pyproject: dict, lock_text: str) -> list[str]:
    """Every way the lock fails the declared ranges (empty when it satisfies them)."""
    pins, found = read_lock(lock_text)
    for where, req in declared(pyproject):
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            found.append(f"{req.name} ({req}, {where}) is not pinned in requirements.lock")
        elif not req.specifier.contains(pin, prereleases=True):
            found.append(f"{req.name}=={pin} in requirements.lock is outside {req.specifier}, the range of {where}")
    return found


def main(argv: list[str]) -> int:
    pyproject_path = Path(argv[0]) if argv else ROOT / "pyproject.toml"
    lock_path = Path(argv[1]) if len(argv) > 1 else ROOT / "requirements.lock"
    pyproject = tomllib.loads(pyproject_path.read_text())
    found = problems(pyproject, lock_path.read_text())
    for problem in found:
        print(f"check_lock: {problem}", file=sys.stderr)
    if not found:
        print(f"check_lock: {lock_path.name} satisfies the {len(declared(pyproject))} requirements of "
              f"{pyproject_path.name}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
