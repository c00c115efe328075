"""Column domains, and the discrete codes the marginal mechanisms work on.

A domain is the set of values a column may take: bin edges for numbers, a category list for text. It comes
from the declared schema, or from a differentially private estimate that spends part of the budget — never
from the real data's exact minima, maxima or category set, which would publish outliers and rare values in
every bin edge.

The estimates use maintained DP code: numeric bounds with SmartNoise's ``approx_bounds`` (a noisy histogram
over powers of two, keeping the outermost bins that clear a noise threshold), categories with OpenDP's
Laplace-threshold mechanism (noisy counts of the values present, released only above a threshold, so a rare
value is dropped). A DP-estimated categorical domain gets an extra ``(other)`` category that stands for every
value the estimate dropped; DP-estimated numeric bounds clamp values outside them into the end bins.

:func:`encode` maps a table to codes (one small integer per cell), :func:`decode` maps codes back to values,
drawing numbers uniformly inside their bin: both use the domain only, so decoding is post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd

from dcr_enclave.formats.errors import DCRError

from .schema import DEFAULT_BINS, MAX_EXACT_INTEGERS, ColumnSpec

OTHER: Final = "(other)"
DECLARED: Final = "declared"
DP_ESTIMATE: Final = "dp-estimate"
DEFAULT_DECIMALS: Final = 2


@dataclass(frozen=True)
class Domain:
    """The domain of one column; ``size`` codes, the last one standing for "missing" when nullable."""

    spec: ColumnSpec
    source: str
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def bins(self) -> int:
        return len(self.edges) - 1 if self.spec.numeric else len(self.categories)

    @property
    def size(self) -> int:
        return self.bins + (1 if self.spec.nullable else 0)

    def labels(self) -> list[str]:
        """A short label per code, for reports."""
        if self.spec.numeric:
            fmt = "{:g}"
            out = [
                f"[{fmt.format(a)}, {fmt.format(b)})"
                for a, b in zip(self.edges, self.edges[1:], strict=False)
            ]
        else:
            out = list(self.categories)
        return out + (["(missing)"] if self.spec.nullable else [])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"column": self.name, "type": self.spec.type, "source": self.source}
        if self.spec.numeric:
            out["edges"] = [float(e) for e in self.edges]
        else:
            out["categories"] = list(self.categories)
        out["nullable"] = self.spec.nullable
        return out


def numeric_edges(spec: ColumnSpec, lo: float, hi: float) -> tuple[float, ...]:
    """Bin edges over ``[lo, hi]``; integer bins hold whole numbers ``[a, b)`` with the last edge ``hi + 1``."""
    bins = spec.bins
    if spec.type == "integer":
        lo, hi = math.floor(lo), math.ceil(hi)
        span = hi - lo + 1
        if bins is None:
            bins = span if span <= MAX_EXACT_INTEGERS else DEFAULT_BINS
        bins = min(bins, span)
        edges = np.unique(np.round(np.linspace(lo, hi + 1, bins + 1)).astype(np.int64))
        return tuple(float(e) for e in edges)
    bins = bins or DEFAULT_BINS
    return tuple(float(e) for e in np.linspace(lo, hi, bins + 1))


def declared_domain(spec: ColumnSpec) -> Domain:
    if spec.numeric:
        assert spec.min is not None and spec.max is not None
        return Domain(spec, DECLARED, edges=numeric_edges(spec, spec.min, spec.max))
    assert spec.categories is not None
    return Domain(spec, DECLARED, categories=tuple(spec.categories))


def estimate_numeric(spec: ColumnSpec, values: np.ndarray, epsilon: float) -> Domain:
    """Bounds from SmartNoise's ε-DP ``approx_bounds`` (missing values are not counted)."""
    from snsql.sql._mechanisms.approx_bounds import approx_bounds

    present = values[~np.isnan(values)]
    lo, hi = approx_bounds(present, epsilon)
    if lo is None or hi is None or not lo < hi:
        raise DCRError(
            f"column {spec.name!r}: could not estimate its range with ε={epsilon:.3g} (too few rows for that budget)",
            hint=f"declare min and max for {spec.name!r} in --schema, or raise --epsilon",
        )
    return Domain(spec, DP_ESTIMATE, edges=numeric_edges(spec, lo, hi))


def estimate_categories(spec: ColumnSpec, values: Sequence[Any], epsilon: float, delta: float) -> Domain:
    """Categories from OpenDP's (ε, δ)-DP Laplace-threshold mechanism over the counts of each value."""
    import opendp.prelude as dp

    dp.enable_features("contrib", "floating-point")
    scale = 1.0 / epsilon
    # Start near where δ = P(noise pushes a count of 1 over the threshold), then let OpenDP's own
    # accounting confirm it; raise the threshold until it does.
    threshold = math.ceil(1 + scale * math.log(1 / (2 * delta)))
    space = dp.vector_domain(dp.atom_domain(T=str)), dp.symmetric_distance()
    for _ in range(200):
        meas = (
            space
            >> dp.t.then_count_by(TV=int)
            >> dp.m.then_laplace_threshold(scale=scale, threshold=threshold)
        )
        eps_used, delta_used = meas.map(1)
        if eps_used <= epsilon * (1 + 1e-9) and delta_used <= delta:
            break
        threshold = math.ceil(threshold * 1.1) + 1
    else:  # pragma: no cover - the loop above always converges for δ > 0
        raise DCRError(f"column {spec.name!r}: cannot calibrate the category estimate for δ={delta:g}")
    released = meas([str(v) for v in values if v is not None])
    cats = sorted(str(k) for k in released if k != OTHER)
    # "(other)" is always there for an estimated domain, so its presence says nothing about the data.
    return Domain(spec, DP_ESTIMATE, categories=(*cats, OTHER))


def encode(df: pd.DataFrame, domains: Sequence[Domain]) -> np.ndarray:
    """The table as an ``(rows, columns)`` array of codes; values outside a domain go to the nearest code
    (numbers) or to ``(other)`` (categories of an estimated domain)."""
    out = np.empty((len(df), len(domains)), dtype=np.int64)
    for j, d in enumerate(domains):
        col = df[d.name]
        missing = col.isna().to_numpy()
        if d.spec.numeric:
            values = col.to_numpy(dtype=float, na_value=np.nan)
            codes = np.searchsorted(np.asarray(d.edges[1:-1]), np.nan_to_num(values), side="right")
            codes = np.clip(codes, 0, d.bins - 1)
        else:
            index = {c: i for i, c in enumerate(d.categories)}
            other = index.get(OTHER, -1)
            values = col.to_numpy(dtype=object)
            codes = np.fromiter(
                (0 if m else index.get(v, other) for v, m in zip(values, missing, strict=True)),
                dtype=np.int64,
                count=len(values),
            )
            if (codes < 0).any():  # a declared domain is exhaustive: the reader refuses values outside it
                raise DCRError(f"column {d.name!r} holds a value outside its declared categories")
        if d.spec.nullable:
            codes = np.where(missing, d.size - 1, codes)
        out[:, j] = codes
    return out


def decode(codes: np.ndarray, domains: Sequence[Domain], rng: np.random.Generator) -> pd.DataFrame:
    """Values for codes: categories as they are, numbers drawn uniformly inside their bin."""
    data: dict[str, pd.Series] = {}
    n = codes.shape[0]
    for j, d in enumerate(domains):
        c = np.clip(codes[:, j], 0, d.size - 1)
        missing = c == d.bins if d.spec.nullable else np.zeros(n, dtype=bool)
        b = np.minimum(c, d.bins - 1)
        if d.spec.numeric:
            edges = np.asarray(d.edges)
            lo, hi = edges[b], edges[b + 1]
            if d.spec.type == "integer":
                values = rng.integers(
                    lo.astype(np.int64), np.maximum(hi.astype(np.int64), lo.astype(np.int64) + 1)
                )
                series = (
                    pd.Series(values.astype(float))
                    .where(~missing)
                    .astype("Int64" if d.spec.nullable else "float")
                )
                if not d.spec.nullable:
                    series = series.astype("int64")
            else:
                decimals = DEFAULT_DECIMALS if d.spec.decimals is None else d.spec.decimals
                values = np.round(rng.uniform(lo, hi), decimals)
                values = np.clip(values, edges[0], edges[-1])
                series = pd.Series(np.where(missing, np.nan, values))
        else:
            cats = np.asarray(d.categories, dtype=object)
            series = pd.Series(np.where(missing, None, cats[b]), dtype=object)
        data[d.name] = series
    return pd.DataFrame(data)
