"""Known vulnerabilities in what the service ships: pip-audit on the installed runtime dependencies.

    python deploy/audit.py [--extra NAME ...] [--print]

Takes the project's runtime dependencies (plus those of ``--extra``), walks their dependency closure
in this environment, pins each to its installed version and hands the list to ``pip-audit --strict``.
The build and dev tools (torch, the test tools) are not shipped in the runtime image and are left out
unless an extra names them.

``--strict`` is the point: a package whose advisories cannot be fetched (no network, a mirror without
the vulnerability data) fails the audit instead of being skipped in silence. Exit status: pip-audit's
(0 clean, 1 a known vulnerability or a package that could not be checked), 2 when pip-audit itself is
missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def roots(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The runtime dependencies in pyproject.toml, plus those of ``extras``, that apply here."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"audit: pyproject.toml has no extra {unknown} (it has {sorted(optional)})")
    lines = [*project["dependencies"], *(line for extra in extras for line in optional[extra])]
    return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """``{name: installed version}`` of ``requirements`` and everything they need, in this environment."""
    found: dict[str, str] = {}
    pending = [(r.name, frozenset(r.extras)) for r in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"audit: {name} is required but not installed here (make install)") from None
        found[canonicalize_name(name)] = dist.version
        for line in dist.requires or ():
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in (*wanted, "")):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="also audit this extra's dependencies")
    parser.add_argument("--print", action="store_true", help="print the pinned list and stop")
    args = parser.parse_args(argv)
    pins = closure(roots(tuple(args.extra)))
    lines = [f"{name}=={version}" for name, version in pins.items()]
    if args.print:
        print("\n".join(lines))
        return 0
    pip_audit = shutil.which("pip-audit", path=str(Path(sys.executable).parent)) or shutil.which("pip-audit")
    if pip_audit is None:
        print("audit: pip-audit is not installed (it is in the dev extra)", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="audit-") as pinned:
        pinned.write("\n".join(lines) + "\n")
        pinned.flush()
        print(f"audit: {len(lines)} installed runtime packages with pip-audit --strict", file=sys.stderr)
        command = [pip_audit, "--strict", "--progress-spinner", "off", "--no-deps", "--disable-pip"]
        result = subprocess.run([*command, "-r", pinned.name], check=False)
    if result.returncode != 0:
        print(
            "audit: FAILED: a known vulnerability (raise the package's lower bound in pyproject.toml), "
            "or packages that could not be checked (pip-audit needs the package index's vulnerability "
            "data: network access)",
            file=sys.stderr,
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
