"""Command line for the model zoo.

    python -m models summary [--json] [--all] [NAME ...]   analytic cost per variant
    python -m models layers [--json] NAME                  the same, layer by layer

With no NAME, ``summary`` covers each family's default model; ``--all`` adds every variant the zoo's
grammar admits. An unknown name exits with status 2 and the zoo's message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from contract.zoo import DEFAULT_MODELS, UnknownModelError, all_variants, parse

_SUMMARY_COLUMNS = (
    # header, key, format
    ("name", "name", "{}"),
    ("variant", "variant", "{}"),
    ("resolution", "resolution", "{}"),
    ("params", "params", "{:,}"),
    ("flops (M mult-adds)", "flops", "{:.2f}"),
    ("memory access cost", "memory_access_cost", "{:,}"),
    ("fp32 bytes", "fp32_bytes", "{:,}"),
)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _names(args: argparse.Namespace) -> list[str]:
    names = list(args.names) or list(DEFAULT_MODELS)
    if getattr(args, "all", False):
        names += [v for v in all_variants() if v not in names]
    for name in names:
        parse(name)  # fail on a bad name before any network is built
    return names


def summary_rows(names: Sequence[str]) -> list[dict]:
    """One JSON-ready record per model name: what it is and its analytic cost."""
    from models.complexity import count

    rows = []
    for name in names:
        spec = parse(name)
        cost = count(name)
        rows.append(
            {
                "name": name,
                "variant": spec.variant,
                "family": spec.family,
                "resolution": spec.resolution,
                "params": cost.params,
                "flops": cost.flops,
                "memory_access_cost": cost.memory_access_cost,
                "fp32_bytes": cost.fp32_bytes,
            }
        )
    return rows


def _summary(args: argparse.Namespace) -> int:
    rows = summary_rows(_names(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cells = []
    for row in rows:
        values = dict(row, flops=row["flops"] / 1e6)
        cells.append([fmt.format(values[key]) for _, key, fmt in _SUMMARY_COLUMNS])
    numeric = [key not in ("name", "variant") for _, key, _ in _SUMMARY_COLUMNS]
    print(_table([h for h, _, _ in _SUMMARY_COLUMNS], cells, numeric))
    return 0


def _layers(args: argparse.Namespace) -> int:
    from models.complexity import layer_costs_for

    spec = parse(args.name)
    rows = layer_costs_for(args.name)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    header = ["layer", "kind", "input", "output", "kernel", "stride", "groups", "flops", "params", "mac"]

    def shape(s: tuple[int, ...] | None) -> str:
        return "x".join(map(str, s)) if s else "-"

    cells = [
        [
            r.name,
            r.kind,
            shape(r.in_shape),
            shape(r.out_shape),
            shape(r.kernel_size),
            shape(r.stride),
            str(r.groups),
            f"{r.flops:,}",
            f"{r.params:,}",
            f"{r.memory_access_cost:,}",
        ]
        for r in rows
    ]
    total = ["total", "", "", "", "", "", ""]
    total += [f"{sum(r.flops for r in rows):,}", f"{sum(r.params for r in rows):,}"]
    total += [f"{sum(r.memory_access_cost for r in rows):,}"]
    numeric = [False, False, True, True, True, True, True, True, True, True]
    print(f"{spec.variant} at {spec.resolution}x{spec.resolution} (conv/FC layers only; params exclude BN)")
    print(_table(header, [*cells, total], numeric))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser(
        "summary",
        help="params, flops (multiply-adds), memory access cost and fp32 size per variant",
        description="Analytic cost per image (conv and FC layers only, as the papers count it).",
    )
    summary.add_argument("names", nargs="*", metavar="NAME", help="model names (default: the four defaults)")
    summary.add_argument("--all", action="store_true", help="every variant the zoo admits")
    summary.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    summary.set_defaults(handler=_summary)

    layers = commands.add_parser("layers", help="the cost of one model, conv/FC layer by layer")
    layers.add_argument("name", metavar="NAME")
    layers.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    layers.set_defaults(handler=_layers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UnknownModelError as exc:
        print(f"python -m models: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
