"""The search behind ``make tune``: the best point of a small discrete space under a time budget, from
noisy measurements. It knows nothing of servers: it calls ``measure(config, phase)`` and reads the
:class:`Sample` back.

1. Search (short measurements): coordinate descent from the start point (the server's defaults). For
   each dimension in turn, the incumbent and every other value of that dimension (the rest held at the
   incumbent's) race by successive halving: each survivor is measured once more per round and the
   better half goes on, until one is left or every survivor has ``repeats`` samples. The winner by
   median becomes the incumbent. Rounds over all dimensions repeat until one changes nothing. Samples
   are kept per point, so a point met again is not measured again. A dimension that does not apply at
   a point (``Dimension.applies``: a queue delay without batching) is held at its first value there,
   so equivalent points are one point.
2. Confirmation (long measurements): the best few points of the search and the start point, measured
   in interleaved rounds (``a b c a b c ...``), so a noisy spell on a shared machine hits all alike;
   the best by median of these samples alone is chosen, reported with its spread and its margin over
   the start point.

Points are compared feasible first (``penalty`` 0: within the user's constraint), then by score; an
infeasible point by its penalty, so the search walks towards feasibility. The budget counts the cost
each sample reports (seconds); the search stops when its share is spent, leaving the rest to confirm.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Config = tuple[tuple[str, Any], ...]  # ((dimension, value), ...) in the space's order: hashable


@dataclass(frozen=True)
class Dimension:
    name: str
    values: tuple[Any, ...]  # the first is what the dimension is held at where it does not apply
    applies: Callable[[Mapping[str, Any]], bool] | None = None


@dataclass(frozen=True)
class Sample:
    """One measurement of one point."""

    score: float  # higher is better (requests/s)
    penalty: float = 0.0  # 0: within the constraint; else how far outside it (ms over the p99 bound)
    cost: float = 0.0  # what it took, in the budget's unit (seconds)
    details: Mapping[str, Any] = field(default_factory=dict)  # kept for the report, not read here


Measure = Callable[[Mapping[str, Any], str], Sample]  # (point, "search" | "confirm") -> sample


@dataclass
class Point:
    config: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)  # the search's
    confirmed: list[Sample] = field(default_factory=list)  # the confirmation's

    def key(self, confirmed: bool = False) -> tuple[float, float]:
        """Sort key, larger is better: feasible before infeasible, then the median score (infeasible:
        the smaller median penalty)."""
        samples = self.confirmed if confirmed else self.samples
        if not samples:
            return (-math.inf, -math.inf)
        penalty = statistics.median(s.penalty for s in samples)
        if penalty > 0:
            return (-penalty, -math.inf)
        return (0.0, statistics.median(s.score for s in samples))

    def spread(self, confirmed: bool = False) -> tuple[float, float, float] | None:
        """(min, median, max) of the score."""
        samples = self.confirmed if confirmed else self.samples
        if not samples:
            return None
        scores = [s.score for s in samples]
        return min(scores), statistics.median(scores), max(scores)


@dataclass
class SearchResult:
    start: Point
    best: Point  # by the confirmation's samples
    finalists: list[Point]  # confirmed, best first (the start among them)
    points: list[Point]  # every point measured, in the order first measured
    spent: float
    budget: float
    stopped_by_budget: bool

    @property
    def margin(self) -> float | None:
        """The best's median score over the start's, both from the confirmation (1.0: no better)."""
        best, start = self.best.spread(True), self.start.spread(True)
        if best is None or start is None or start[1] <= 0:
            return None
        return best[1] / start[1]


class _Budget(Exception):
    """The search's share of the budget is spent."""


class Search:
    """One run of the search over ``space`` from ``start`` (a value for every dimension)."""

    def __init__(
        self,
        space: Sequence[Dimension],
        start: Mapping[str, Any],
        measure: Measure,
        *,
        budget: float,
        repeats: int = 3,
        finalists: int = 2,
        confirm_rounds: int = 3,
        confirm_share: float = 0.35,
        max_rounds: int = 3,
    ) -> None:
        for dimension in space:
            if start[dimension.name] not in dimension.values:
                raise ValueError(f"start {dimension.name}={start[dimension.name]!r} is not among its values")
        self.space = tuple(space)
        self.measure = measure
        self.budget = budget
        self.repeats = max(1, repeats)
        self.finalists = max(1, finalists)
        self.confirm_rounds = max(1, confirm_rounds)
        self.confirm_share = confirm_share
        self.max_rounds = max_rounds
        self.points: dict[Config, Point] = {}
        self.spent = 0.0
        self._search_costs: list[float] = []
        self.start = self._point(start)

    # --- points ---------------------------------------------------------------------------------
    def canonical(self, config: Mapping[str, Any]) -> Config:
        """``config`` with every dimension that does not apply held at its first value."""
        values = dict(config)
        for dimension in self.space:
            if dimension.applies is not None and not dimension.applies(values):
                values[dimension.name] = dimension.values[0]
        return tuple((dimension.name, values[dimension.name]) for dimension in self.space)

    def _point(self, config: Mapping[str, Any]) -> Point:
        key = self.canonical(config)
        if key not in self.points:
            self.points[key] = Point(dict(key))
        return self.points[key]

    def _sample(self, point: Point) -> None:
        """One more search sample of ``point``, if the search's share of the budget allows one."""
        expected = statistics.mean(self._search_costs) if self._search_costs else 0.0
        if self.spent + expected > self.budget * (1 - self.confirm_share):
            raise _Budget
        sample = self.measure(dict(point.config), "search")
        self.spent += sample.cost
        self._search_costs.append(sample.cost)
        point.samples.append(sample)

    # --- the search -----------------------------------------------------------------------------
    def _race(self, incumbent: Point, dimension: Dimension) -> Point:
        """Successive halving over ``dimension``'s values at the incumbent; the winner."""
        contenders = [incumbent]
        for value in dimension.values:
            point = self._point({**incumbent.config, dimension.name: value})
            if point not in contenders:
                contenders.append(point)
        if len(contenders) == 1:
            return incumbent
        survivors = contenders
        for round_ in range(1, self.repeats + 1):
            for point in survivors:
                while len(point.samples) < round_:
                    self._sample(point)
            if len(survivors) == 1:
                break
            survivors = sorted(survivors, key=Point.key, reverse=True)[: math.ceil(len(survivors) / 2)]
        # Moving needs a better median than the incumbent's, on its own samples.
        best = max(survivors, key=Point.key)
        return best if best.key() > incumbent.key() else incumbent

    def run(self) -> SearchResult:
        stopped = False
        incumbent = self.start
        try:
            while len(incumbent.samples) < self.repeats:  # the start's noise, before anything moves
                self._sample(incumbent)
            for _ in range(self.max_rounds):
                before = incumbent
                for dimension in self.space:
                    if dimension.applies is None or dimension.applies(incumbent.config):
                        incumbent = self._race(incumbent, dimension)
                if incumbent is before:
                    break
        except _Budget:
            stopped = True
        return self._confirm(stopped)

    def _confirm(self, stopped: bool) -> SearchResult:
        measured = [point for point in self.points.values() if point.samples]
        ranked = sorted(measured, key=Point.key, reverse=True)
        finalists = [point for point in ranked if point is not self.start][: self.finalists]
        finalists.append(self.start)
        for round_ in range(self.confirm_rounds):
            # The first round always runs (every finalist gets a long sample); later ones while they fit.
            if round_ > 0 and self.spent + self._confirm_cost(finalists) * len(finalists) > self.budget:
                stopped = True
                break
            for point in finalists:
                sample = self.measure(dict(point.config), "confirm")
                self.spent += sample.cost
                point.confirmed.append(sample)
        ranked_final = sorted(finalists, key=lambda p: p.key(True), reverse=True)
        return SearchResult(
            start=self.start,
            best=ranked_final[0],
            finalists=ranked_final,
            points=measured,
            spent=self.spent,
            budget=self.budget,
            stopped_by_budget=stopped,
        )

    def _confirm_cost(self, finalists: list[Point]) -> float:
        costs = [s.cost for p in finalists for s in p.confirmed]
        return statistics.mean(costs) if costs else 0.0


def search(
    space: Sequence[Dimension], start: Mapping[str, Any], measure: Measure, *, budget: float, **options: Any
) -> SearchResult:
    """Coordinate descent with successive halving, then an interleaved confirmation (module docstring)."""
    return Search(space, start, measure, budget=budget, **options).run()
