"""The joint attribute grid of a policy and the product that owns each of its cells.

A *cell* is one value for every attribute (icm-sexy: 4 regions x 9 exposures x 11 actions
x 6 cues = 2376 cells). A product *matches* a cell when the cell has every value the
product sets. Precedence, so that every cell has at most one owner:

1. among the products that match a cell, the most specific one (that sets the most
   attributes) owns it;
2. among equally specific matching products, the one with the highest ``priority``
   (default 0) owns it;
3. two products still level on a cell are a *tie*: a validation error
   (:func:`icm.policy.validate.check_policy`), since the cell's product would be arbitrary.

Cells no product matches are *uncovered*: every rule set labels them with its ``default``
(a rule set without a default while cells are uncovered is a validation error).

The map is computed once per policy (``Policy.grid``, cached) as an integer array over
the grid, so that a decision is a few vectorised operations (:mod:`icm.policy.decision`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from icm.policy.model import Policy, Product

MAX_CELLS = 2_000_000
"""Largest grid a policy may have (the grid is enumerated as an array)."""

MAX_WORK = 100_000_000
"""Most cells building the map may visit (see :func:`grid_work`)."""

UNCOVERED = -1
"""Owner of a cell no product matches."""

MAX_TIES = 100
"""At most this many tied pairs of products are named."""

MAX_PAIR_CHECKS = 200_000
"""At most this many pairs of equally ranked products are checked for a tie per rank."""


def grid_work(policy: Policy) -> int:
    """Cells visited to build the map: the sum over products of the cells each matches."""
    sizes = {a.id: len(a.values) for a in policy.attributes}
    n = grid_size(policy)
    return sum(n // math.prod(sizes[a] for a in p.assignment) for p in policy.products)


@dataclass(frozen=True, eq=False)
class Tie:
    """Two equally specific products of equal priority that both match some cells."""

    first: int
    second: int
    cells: int
    example: tuple[int, ...]


# eq=False: a Policy's cached grid lives in its __dict__, which pydantic compares first
# when comparing policies; numpy arrays cannot be compared that way.
@dataclass(frozen=True, eq=False)
class CellGrid:
    """Which product owns each cell of a policy's attribute grid.

    ``owner`` has one axis per attribute (policy order; values in attribute order) and holds
    the index of the owning product in ``policy.products``, or ``UNCOVERED``. ``positive``
    holds, per cell, 1.0 when an image there is an instance of the term, 0.0 when it is not
    and 0.5 when unknown (uncovered cells without ``uncovered_positive``).
    """

    attributes: tuple[str, ...]
    values: tuple[tuple[str, ...], ...]
    product_ids: tuple[str, ...]
    owner: np.ndarray
    positive: np.ndarray
    ties: tuple[Tie, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    @property
    def n_cells(self) -> int:
        return int(self.owner.size)

    @property
    def owner_flat(self) -> np.ndarray:
        return self.owner.reshape(-1)

    @property
    def n_uncovered(self) -> int:
        return int(np.count_nonzero(self.owner == UNCOVERED))

    def cells_per_product(self) -> dict[str, int]:
        counts = np.bincount(self.owner_flat + 1, minlength=len(self.product_ids) + 1)
        return {pid: int(counts[i + 1]) for i, pid in enumerate(self.product_ids)}

    def cell(self, index: int | tuple[int, ...]) -> dict[str, str]:
        """The cell at a flat index or an index tuple, as ``{attribute: value}``."""
        idx: tuple[Any, ...] = np.unravel_index(index, self.shape) if isinstance(index, (int, np.integer)) else index
        return {a: self.values[k][int(i)] for k, (a, i) in enumerate(zip(self.attributes, idx, strict=True))}

    def uncovered_example(self) -> dict[str, str] | None:
        hits = np.flatnonzero(self.owner_flat == UNCOVERED)
        return self.cell(int(hits[0])) if hits.size else None


def describe_cell(cell: dict[str, str]) -> str:
    return ", ".join(f"{a}={v}" for a, v in cell.items())


def grid_size(policy: Policy) -> int:
    n = 1
    for a in policy.attributes:
        n *= len(a.values)
    return n


def _selector(policy_axes: dict[str, int], value_index: dict[str, dict[str, int]], assignment: dict[str, str], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices selecting the cells that match ``assignment`` (slices, so that it is a view)."""
    sel = [slice(0, n) for n in shape]
    for attr, value in assignment.items():
        i = value_index[attr][value]
        sel[policy_axes[attr]] = slice(i, i + 1)
    return tuple(sel)


def _compatible(a: Product, b: Product) -> bool:
    """Whether some cell matches both (they agree on every attribute both set)."""
    return all(b.assignment.get(k, v) == v for k, v in a.assignment.items())


def build_grid(policy: Policy) -> CellGrid:
    """The precedence map of ``policy`` (see the module docstring).

    Assumes the cross-references are valid (known attributes and values) and the grid is
    within ``MAX_CELLS`` and ``MAX_WORK``; :func:`icm.policy.validate.check_policy` checks both first.
    """
    attrs = policy.attributes
    axes = {a.id: k for k, a in enumerate(attrs)}
    value_index = {a.id: {v: i for i, v in enumerate(a.value_ids)} for a in attrs}
    shape = tuple(len(a.values) for a in attrs)
    if grid_size(policy) > MAX_CELLS or grid_work(policy) > MAX_WORK:
        raise ValueError(f"policy {policy.name!r}: the attribute grid is too large to map ({grid_size(policy)} cells)")
    owner = np.full(shape, UNCOVERED, dtype=np.int32)
    products = policy.products
    sels = [_selector(axes, value_index, p.assignment, shape) for p in products]

    # groups of equal precedence, highest first
    keys = sorted({(len(p.assignment), p.priority) for p in products}, reverse=True)
    ties: list[Tie] = []
    for key in keys:
        group = [i for i, p in enumerate(products) if (len(p.assignment), p.priority) == key]
        free = owner == UNCOVERED  # cells no higher-precedence product took
        if len(group) > 1:
            count = np.zeros(shape, dtype=np.int32)
            for i in group:
                count[sels[i]] += 1
            tied = (count > 1) & free
            if tied.any():
                # name every tied pair with one example cell (at most MAX_TIES, to bound the work)
                candidates = [i for i in group if tied[sels[i]].any()]
                reported = len(ties)
                for checked, (i, j) in enumerate(combinations(candidates, 2)):
                    if len(ties) >= MAX_TIES or checked >= MAX_PAIR_CHECKS:
                        break
                    if not _compatible(products[i], products[j]):
                        continue
                    both = _selector(axes, value_index, {**products[i].assignment, **products[j].assignment}, shape)
                    sub = free[both]  # a free cell both match: neither outranks the other there
                    n = int(np.count_nonzero(sub))
                    if n:
                        first = np.argwhere(sub)[0]
                        ties.append(Tie(i, j, n, tuple(s.start + int(k) for s, k in zip(both, first, strict=True))))
                if len(ties) == reported and len(ties) < MAX_TIES:  # checks ran out: name one anyway
                    cell = np.unravel_index(int(np.argmax(tied)), shape)
                    i, j = [k for k in candidates if all(sl.start <= c < sl.stop for sl, c in zip(sels[k], cell, strict=True))][:2]
                    both = _selector(axes, value_index, {**products[i].assignment, **products[j].assignment}, shape)
                    ties.append(Tie(i, j, int(np.count_nonzero(free[both])), tuple(int(c) for c in cell)))
        for i in group:  # file order: on a tie (an error) the earlier product keeps the cell
            view = owner[sels[i]]
            view[view == UNCOVERED] = i

    if policy.uncovered_positive is None:
        unc = 0.5
    else:
        unc = 1.0 if policy.uncovered_positive else 0.0
    pos_of = np.array([unc] + [1.0 if p.positive else 0.0 for p in products])
    positive = pos_of[owner + 1]
    return CellGrid(
        attributes=tuple(a.id for a in attrs),
        values=tuple(tuple(a.value_ids) for a in attrs),
        product_ids=tuple(p.id for p in products),
        owner=owner,
        positive=positive.reshape(-1),
        ties=tuple(ties),
    )
