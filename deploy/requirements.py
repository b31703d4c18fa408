"""Print the project's requirements from pyproject.toml, one per line, for ``pip install -r``.

    python deploy/requirements.py [--extra NAME ...] [--extra-if-present NAME ...] [--exclude NAME ...]

The Dockerfile installs the dependencies in a layer of their own, before the sources are copied, so
that editing the code does not reinstall torch. ``--exclude`` drops a requirement that something
else provides: a runtime one that an extra replaces (the GPU image swaps ``onnxruntime`` for
``onnxruntime-gpu``: both provide the same module and must not be installed side by side), or an
extra's CUDA library wheels where the base image already has those libraries.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(
    project: dict, extras: list[str], exclude: list[str], extras_if_present: list[str] = ()
) -> list[str]:
    """Runtime dependencies plus those of ``extras`` (a missing one is an error) and of whichever of
    ``extras_if_present`` pyproject defines, less ``exclude``."""
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {unknown} (it has {sorted(optional)})")
    chosen = list(project.get("dependencies", []))
    for extra in [*extras, *(extra for extra in extras_if_present if extra in optional)]:
        chosen += optional[extra]
    dropped = {_name(name) for name in exclude}
    return [req for req in chosen if _name(req) not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group")
    parser.add_argument(
        "--extra-if-present", action="append", default=[], help="an extra to add when pyproject defines it"
    )
    parser.add_argument("--exclude", action="append", default=[], help="a requirement to leave out")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    chosen = requirements(project, args.extra, args.exclude, args.extra_if_present)
    sys.stdout.write("".join(f"{req}\n" for req in chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
