"""pyproject.toml's floors never slip below a release that fixed a known advisory."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[2]


def advisories() -> list[tuple[str, Version, str]]:
    rows = []
    for line in (ROOT / "docs" / "dependency-advisories.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d+(\.\d+)*", cells[1]):
            rows.append((cells[0], Version(cells[1]), cells[2]))
    return rows


def floors() -> dict[str, list[Version]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, list[Version]] = {}
    for line in [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]:
        requirement = Requirement(line)
        minimum = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        found.setdefault(requirement.name.lower(), []).append(max(minimum) if minimum else Version("0"))
    return found


def test_the_table_lists_the_advisories_the_issue_names():
    assert {package for package, _, _ in advisories()} >= {"pillow", "torch", "ray", "starlette", "fastapi"}
    assert all(advisory.startswith(("CVE-", "GHSA-")) for _, _, advisory in advisories())


def test_every_floor_is_at_least_the_fixed_release():
    found = floors()
    problems = []
    for package, fixed, advisory in advisories():
        if package not in found:
            problems.append(f"{package}: not in pyproject.toml, but {advisory} is fixed only from {fixed}; add '{package}>={fixed}'")
            continue
        for floor in found[package]:
            if floor < fixed:
                problems.append(f"{package}: floor {floor} admits releases before {fixed} ({advisory})")
    assert not problems, "\n".join(problems)
