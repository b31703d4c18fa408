"""Where a model's files live in the repository: the build writes there, the server reads there.

A model may hold numbered versions, as Triton lays them out::

    model_repository/
      mobilenet_v2/
        1/model.json, model.onnx, ...
        2/model.json, model.onnx, ...
      shufflenet_v2/
        model.json, model.onnx, ...     <- no version directories: version 1

A version is a directory named by a positive integer with a manifest in it. The layout without version
directories, which every build wrote before versions existed, is version 1; where a model has both,
its ``1/`` directory wins and the files beside it are ignored.
"""

from __future__ import annotations

from pathlib import Path

from contract.manifest import MANIFEST_FILE

__all__ = ["FLAT_VERSION", "Fingerprint", "fingerprint", "model_directory", "model_names", "versions"]

FLAT_VERSION = 1  # the version of a model directory without version directories

# What a version's files looked like when read: (path relative to the version, size, mtime in ns), sorted.
Fingerprint = tuple[tuple[str, int, int], ...]


def model_directory(root: Path, name: str, version: int | None = None) -> Path:
    """The directory a model's files go in: ``root/name`` (no version) or ``root/name/version``."""
    if version is None:
        return root / name
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"a model version is an integer >= 1, got {version!r}")
    return root / name / str(version)


def _is_version_name(name: str) -> bool:
    # "01" would be a second spelling of version 1: only the canonical integer counts.
    return name.isdigit() and name.isascii() and str(int(name)) == name and int(name) >= 1


def versions(model_root: Path) -> dict[int, Path]:
    """Every version a model directory holds, oldest first: ``{version: directory}``."""
    found: dict[int, Path] = {}
    if not model_root.is_dir():
        return found
    for entry in model_root.iterdir():
        if _is_version_name(entry.name) and (entry / MANIFEST_FILE).is_file():
            found[int(entry.name)] = entry
    if FLAT_VERSION not in found and (model_root / MANIFEST_FILE).is_file():
        found[FLAT_VERSION] = model_root
    return dict(sorted(found.items()))


def model_names(root: Path) -> list[str]:
    """The models a repository holds (directories with at least one version), sorted."""
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and versions(entry))


def fingerprint(version_dir: Path) -> Fingerprint:
    """The files of one version as they are now; two equal fingerprints mean nothing was rewritten.

    Version directories below a flat model directory belong to other versions and are left out."""
    flat = (version_dir / MANIFEST_FILE).is_file() and not _is_version_name(version_dir.name)
    entries: list[tuple[str, int, int]] = []
    for path in version_dir.rglob("*"):
        relative = path.relative_to(version_dir)
        if flat and _is_version_name(relative.parts[0]):
            continue
        try:
            stat = path.stat()
        except OSError:  # removed while we looked: the next look sees the change
            continue
        if path.is_file():
            entries.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))
