"""The ShuffleNet v2 paper's experiments, rerun on the deployment hardware through the service's runtime."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class _Row(Protocol):
    def to_dict(self) -> dict: ...


def print_rows(table: str, rows: Sequence[_Row], json_path: Path | None) -> None:
    """What each experiment's command prints (its table) and, with ``--json``, the rows it writes."""
    print(table)
    if json_path:
        json_path.write_text(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")
