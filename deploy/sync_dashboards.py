"""Copy the Grafana dashboards into the Kubernetes base, where kustomize can read them.

    python deploy/sync_dashboards.py [--check]

monitoring/grafana/dashboards/*.json is the source of truth (docker-compose mounts it directly).
kustomize refuses to read files outside a kustomization's directory, so k8s/base/dashboards/ holds a
copy for the ConfigMap generator; tests/test_deploy.py fails while the copy is stale. ``--check``
only reports (exit 1 when a copy differs, is missing or is left over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "monitoring" / "grafana" / "dashboards"
COPY = ROOT / "k8s" / "base" / "dashboards"


def stale(source: Path = SOURCE, copy: Path = COPY) -> list[str]:
    """Names of the dashboard files whose copy differs from the source, is missing or is extra."""
    wanted = {path.name: path.read_bytes() for path in sorted(source.glob("*.json"))}
    present = {path.name: path.read_bytes() for path in sorted(copy.glob("*.json"))}
    if not wanted:  # the monitoring dashboards have not been generated yet: nothing to compare
        return []
    return sorted(name for name in wanted.keys() | present.keys() if wanted.get(name) != present.get(name))


def sync(source: Path = SOURCE, copy: Path = COPY) -> list[str]:
    """Make ``copy`` mirror the dashboards of ``source``; returns the names it changed."""
    changed = stale(source, copy)
    copy.mkdir(parents=True, exist_ok=True)
    for name in changed:
        if (source / name).exists():
            shutil.copyfile(source / name, copy / name)
        else:
            (copy / name).unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale copies, change nothing")
    args = parser.parse_args(argv)
    names = stale() if args.check else sync()
    for name in names:
        print(f"{'stale' if args.check else 'synced'}: k8s/base/dashboards/{name}")
    return 1 if args.check and names else 0


if __name__ == "__main__":
    sys.exit(main())
