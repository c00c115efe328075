"""The fidelity report: how close a synthetic table is to the real one, as JSON and an HTML page with plots.

Two audiences, and every file says which one it is for:

- **provider-only** (:func:`provider_report`): computed from the real rows — per-column marginal distances,
  pairwise association differences, a utility check (a model trained on synthetic rows and one trained on real
  rows, both scored on held-back real rows) and closest-record distances. It is *not* differentially private:
  keep it with the real data.
- **researchers** (:func:`researcher_report`): computed only from differentially private statistics of the
  real table (Laplace-noised 1- and 2-way histograms from OpenDP, spending the declared report budget) and
  from the synthetic table. It has marginal distances and association differences, no utility check (that
  needs real rows) and no closest-record distances. Each of its statistics of the real side carries its
  uncertainty, simulated from the public noise scale (:func:`noisy_statistic`): an interval, or "noise
  dominates" and no value where noise alone could have produced it.

Distances: a column's marginal distance is the total variation distance between its real and synthetic
distributions over the column's domain (bins for numbers), between 0 (same) and 1 (disjoint). Association is
Cramér's V of each column pair's contingency table; the report gives the absolute real-minus-synthetic
differences.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from dcr_enclave.formats.errors import DCRError

from .domain import Domain, encode
from .schema import TableSchema

PROVIDER: Final = "provider-only"
RESEARCHERS: Final = "researchers"
REPORT_SCHEMA: Final = "dcr/fidelity-report/v1"
HOLDOUT_SHARE: Final = 0.2
#: Rows compared in closest-record distances (quadratic cost).
MAX_DISTANCE_ROWS: Final = 2000
_NOTICE = {
    PROVIDER: "PROVIDER ONLY. Computed from the real rows; not differentially private. Do not share it with "
    "researchers.",
    RESEARCHERS: "For researchers. Computed only from differentially private statistics of the real data "
    "(the report budget below) and from the synthetic data.",
}


# ---------------------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------------------


def histogram(codes: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(codes, minlength=size).astype(float)


def tvd(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Total variation distance of two (possibly noisy, clipped) count vectors."""
    return float(tvd_batch(np.asarray(p_counts, dtype=float)[None], np.asarray(q_counts, dtype=float))[0])


def tvd_batch(p_counts: np.ndarray, q_counts: np.ndarray) -> np.ndarray:
    """:func:`tvd` of each row of ``p_counts`` (draws × cells) against ``q_counts``."""
    p = np.clip(p_counts, 0, None)
    q = np.clip(q_counts, 0, None)
    ps = p.sum(axis=-1, keepdims=True)
    if q.sum() <= 0:
        return np.ones(p.shape[0])
    out = 0.5 * np.abs(p / np.where(ps > 0, ps, 1) - q / q.sum()).sum(axis=-1)
    return np.where(ps[:, 0] > 0, out, 1.0)


def cramers_v(table: np.ndarray) -> float:
    """Cramér's V of a contingency table (0: independent, 1: one column determines the other)."""
    return float(cramers_v_batch(np.asarray(table, dtype=float)[None])[0])


def cramers_v_batch(tables: np.ndarray) -> np.ndarray:
    """:func:`cramers_v` of each table in ``tables`` (draws × rows × columns); negative counts (noise) are
    clipped to 0, and empty rows and columns do not count."""
    t = np.clip(np.asarray(tables, dtype=float), 0, None)
    rows, cols = t.sum(axis=2), t.sum(axis=1)
    n = rows.sum(axis=1)
    expected = rows[:, :, None] * cols[:, None, :] / np.where(n > 0, n, 1)[:, None, None]
    filled = expected > 0
    chi2 = (np.where(filled, (t - expected) ** 2, 0.0) / np.where(filled, expected, 1.0)).sum(axis=(1, 2))
    k = np.minimum((rows > 0).sum(axis=1), (cols > 0).sum(axis=1)) - 1
    ok = (n > 0) & (k >= 1)
    v2 = chi2 / np.where(ok, n, 1) / np.where(ok, k, 1)
    return np.where(ok, np.sqrt(np.minimum(1.0, v2)), 0.0)


def pair_table(codes: np.ndarray, i: int, j: int, sizes: Sequence[int]) -> np.ndarray:
    flat = codes[:, i] * sizes[j] + codes[:, j]
    return np.bincount(flat, minlength=sizes[i] * sizes[j]).reshape(sizes[i], sizes[j]).astype(float)


def marginal_distances(
    real: np.ndarray, synthetic: np.ndarray, domains: Sequence[Domain]
) -> dict[str, float]:
    """Per column: TVD between real and synthetic distributions over the column's domain codes."""
    return {
        d.name: tvd(histogram(real[:, j], d.size), histogram(synthetic[:, j], d.size))
        for j, d in enumerate(domains)
    }


def association_differences(
    real: np.ndarray, synthetic: np.ndarray, domains: Sequence[Domain]
) -> list[dict[str, Any]]:
    """Per column pair: Cramér's V in real and synthetic data and their absolute difference."""
    sizes = [d.size for d in domains]
    out = []
    for i, j in itertools.combinations(range(len(domains)), 2):
        vr = cramers_v(pair_table(real, i, j, sizes))
        vs = cramers_v(pair_table(synthetic, i, j, sizes))
        out.append(
            {
                "columns": [domains[i].name, domains[j].name],
                "real": vr,
                "synthetic": vs,
                "difference": abs(vr - vs),
            }
        )
    return out


def _features(df: pd.DataFrame, domains: Sequence[Domain], target: str) -> tuple[np.ndarray, list[bool]]:
    cols, categorical = [], []
    codes = encode(df, domains)
    for j, d in enumerate(domains):
        if d.name == target:
            continue
        if d.spec.numeric:
            cols.append(df[d.name].to_numpy(dtype=float, na_value=np.nan))
            categorical.append(False)
        else:
            cols.append(codes[:, j].astype(float))
            categorical.append(True)
    return np.column_stack(cols), categorical


def library_seed(seed: int, purpose: int) -> int:
    """A seed for a library that takes 32-bit seeds (scikit-learn's ``random_state`` must lie in
    ``[0, 2**32 - 1]``), derived from ``seed`` (any non-negative integer) and a per-use ``purpose`` number, so
    no caller's seed can be out of the library's range."""
    return int(np.random.SeedSequence([seed, purpose]).generate_state(1, dtype=np.uint32)[0])


def utility(
    train: pd.DataFrame,
    synthetic: pd.DataFrame,
    holdout: pd.DataFrame,
    domains: Sequence[Domain],
    target: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Score on ``holdout`` of a model trained on ``synthetic`` and of one trained on ``train`` (real).

    Gradient-boosted trees (scikit-learn); R² for a numeric target, accuracy for a categorical one.
    ``seed`` is any non-negative integer.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import accuracy_score, r2_score

    dom = {d.name: d for d in domains}
    if target not in dom:
        raise DCRError(f"the utility target {target!r} is not a column")
    if len(domains) < 2:
        return {"target": target, "metric": None, "note": "a single column has nothing to predict from"}
    numeric = dom[target].spec.numeric
    tcode = [d.name for d in domains].index(target)

    def xy(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        x, cat = _features(df, domains, target)
        y = df[target].to_numpy(dtype=float, na_value=np.nan) if numeric else encode(df, domains)[:, tcode]
        keep = ~np.isnan(y) if numeric else np.ones(len(y), dtype=bool)
        return x[keep], y[keep], cat

    scores = {}
    random_state = library_seed(seed, 13)
    xh, yh, cat = xy(holdout)
    for name, frame in (("real", train), ("synthetic", synthetic)):
        x, y, _ = xy(frame)
        if numeric:
            model: Any = HistGradientBoostingRegressor(
                categorical_features=cat or None, random_state=random_state
            )
        else:
            model = HistGradientBoostingClassifier(
                categorical_features=cat or None, random_state=random_state
            )
        if len(np.unique(y)) < 2:  # a constant target trains no model; predicting it is the honest baseline
            pred = np.full(len(yh), y[0] if len(y) else 0)
        else:
            model.fit(x, y)
            pred = model.predict(xh)
        scores[name] = float(r2_score(yh, pred) if numeric else accuracy_score(yh, pred))
    return {
        "target": target,
        "model": "histogram gradient boosting (scikit-learn)",
        "metric": "R²" if numeric else "accuracy",
        "trained_on_real": scores["real"],
        "trained_on_synthetic": scores["synthetic"],
        "holdout_rows": len(holdout),
    }


def closest_record_distances(a: pd.DataFrame, b: pd.DataFrame, domains: Sequence[Domain]) -> np.ndarray:
    """For each row of ``a``, the distance to its closest row of ``b``: the mean over columns of
    ``|x - y| / domain width`` (numbers) or ``x != y`` (categories); 0 means an exact copy."""
    parts_a, parts_b, numeric = [], [], []
    for d in domains:
        if d.spec.numeric:
            width = (d.edges[-1] - d.edges[0]) or 1.0
            parts_a.append(np.nan_to_num(a[d.name].to_numpy(dtype=float, na_value=np.nan), nan=-1e9) / width)
            parts_b.append(np.nan_to_num(b[d.name].to_numpy(dtype=float, na_value=np.nan), nan=-1e9) / width)
            numeric.append(True)
        else:
            index = {c: i for i, c in enumerate(d.categories)}
            for frame, parts in ((a, parts_a), (b, parts_b)):
                parts.append(
                    np.array([index.get(v, -1) if v is not None else -2 for v in frame[d.name]], dtype=float)
                )
            numeric.append(False)
    xa, xb = np.column_stack(parts_a), np.column_stack(parts_b)
    is_num = np.array(numeric)
    out = np.empty(len(xa))
    for start in range(0, len(xa), 256):
        block = xa[start : start + 256, None, :] - xb[None, :, :]
        dist = np.where(is_num, np.minimum(np.abs(block), 1.0), block != 0).mean(axis=2)
        out[start : start + 256] = dist.min(axis=1)
    return out


def _split(df: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(df))
    cut = max(1, round(len(df) * HOLDOUT_SHARE))
    return df.iloc[order[cut:]].reset_index(drop=True), df.iloc[order[:cut]].reset_index(drop=True)


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    if len(df) <= n:
        return df
    return df.iloc[np.random.default_rng([seed, 11]).choice(len(df), n, replace=False)].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Uncertainty of statistics of noisy counts
# ---------------------------------------------------------------------------------------------------------

#: Coverage of the intervals given for DP statistics.
INTERVAL_LEVEL: Final = 0.95
#: A DP statistic is given as a number only if it exceeds this quantile of what noise alone produces.
NOISE_LEVEL: Final = 0.999
#: Simulated noise draws per statistic (enough to place the NOISE_LEVEL quantile).
NOISE_DRAWS: Final = 10_000


def noisy_statistic(
    stat: Callable[[np.ndarray], np.ndarray],
    noisy: np.ndarray,
    null: np.ndarray,
    scale: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """A statistic of Laplace-noised counts with its uncertainty, from the noise scale alone.

    ``stat`` maps a batch of count arrays (draws × the shape of ``noisy``) to one value each; ``null`` is
    the counts at which the statistic is 0 (the synthetic distribution for a distance, the product of the
    margins for an association). Everything here is computed from the noisy counts and the public scale
    by simulation: post-processing, so it costs no privacy budget.

    * ``noise_floor``: the :data:`NOISE_LEVEL` quantile of the statistic when the truth is ``null`` and only
      the noise moves it. Noise inflates both measures (noisy cells look like dependence and like distance),
      so an observed value at or below the floor says nothing: ``value`` and ``interval`` are then ``None``
      and ``noise_dominates`` is true.
    * otherwise ``value`` is the statistic of the noisy counts and ``interval`` an approximate
      :data:`INTERVAL_LEVEL` interval for the statistic of the true counts, clipped to [0, 1]: the union of
      the basic bootstrap interval (``2·value`` minus the quantiles of the statistic of the noisy counts
      noised again, which removes the noise's bias to first order), the percentile interval, and ``value ±
      noise_floor``. Simulated on tables with known statistics, the union covered the true value in every
      run; each part alone fell short near the floor and near 1.
    """
    observed = float(stat(noisy[None])[0])
    shape = (NOISE_DRAWS, *noisy.shape)
    floor = float(np.quantile(stat(null[None] + rng.laplace(0.0, scale, shape)), NOISE_LEVEL))
    if observed <= floor:
        return {"value": None, "interval": None, "noise_dominates": True, "noise_floor": floor}
    again = stat(np.clip(noisy, 0, None)[None] + rng.laplace(0.0, scale, shape))
    tail = (1 - INTERVAL_LEVEL) / 2
    q_lo, q_hi = np.quantile(again, [tail, 1 - tail])
    # The widest of three readings: the basic and the percentile bootstrap intervals, and the value plus or
    # minus what noise alone reaches (noise lifts a weak association and can flatten a strong one, by more
    # than re-noising shows near the ends of [0, 1]).
    lo = min(2 * observed - q_hi, q_lo, observed - floor)
    hi = max(2 * observed - q_lo, q_hi, observed + floor)
    interval = [float(np.clip(lo, 0, 1)), float(np.clip(hi, 0, 1))]
    return {"value": observed, "interval": interval, "noise_dominates": False, "noise_floor": floor}


def _tvd_against(q_counts: np.ndarray, p_counts: np.ndarray) -> np.ndarray:
    return tvd_batch(p_counts, q_counts)


def _distance_to(value: float, interval: Sequence[float]) -> list[float]:
    """Interval of ``|x - value|`` for ``x`` in ``interval``."""
    lo, hi = interval
    near = 0.0 if lo <= value <= hi else min(abs(lo - value), abs(hi - value))
    return [near, max(abs(lo - value), abs(hi - value))]


# ---------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------


def _marginal_plot_data(
    real_counts: list[np.ndarray], syn_counts: list[np.ndarray], domains: Sequence[Domain]
) -> list[dict[str, Any]]:
    out = []
    for d, r, s in zip(domains, real_counts, syn_counts, strict=True):
        rp = np.clip(r, 0, None)
        out.append(
            {
                "column": d.name,
                "labels": d.labels(),
                "real": (rp / rp.sum()).tolist() if rp.sum() > 0 else [0.0] * len(rp),
                "synthetic": (s / s.sum()).tolist() if s.sum() > 0 else [0.0] * len(s),
            }
        )
    return out


def provider_report(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    domains: Sequence[Domain],
    schema: TableSchema,
    context: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """The provider-only report (from the real rows; not DP)."""
    rc, sc = encode(real, domains), encode(synthetic, domains)
    target = schema.target or schema.names[-1]
    train, holdout = _split(real, seed)
    util = utility(train, synthetic, holdout, domains, target, seed)
    util["note"] = (
        "The synthesizer saw every real row, the held-back ones included, so the synthetic-trained score is "
        "optimistic by at most what its privacy budget allows."
    )
    syn_s, real_s = _sample(synthetic, MAX_DISTANCE_ROWS, seed), _sample(train, MAX_DISTANCE_ROWS, seed)
    hold_s = _sample(holdout, MAX_DISTANCE_ROWS, seed)
    d_syn = closest_record_distances(syn_s, real_s, domains)
    d_hold = closest_record_distances(hold_s, real_s, domains)
    sizes = [d.size for d in domains]
    return {
        "schema": REPORT_SCHEMA,
        "audience": PROVIDER,
        "notice": _NOTICE[PROVIDER],
        **context,
        "rows": {"real": len(real), "synthetic": len(synthetic)},
        "domains": [d.to_json() for d in domains],
        "marginal_distance": marginal_distances(rc, sc, domains),
        "association": association_differences(rc, sc, domains),
        "utility": util,
        "closest_record": {
            "description": "distance from each synthetic row (and, for reference, each held-back real row) to "
            "its closest real training row; 0 is an exact copy",
            "synthetic_exact_copies": float(np.mean(d_syn == 0)),
            "holdout_exact_copies": float(np.mean(d_hold == 0)),
            "synthetic_quantiles": np.quantile(d_syn, [0.01, 0.05, 0.5]).tolist(),
            "holdout_quantiles": np.quantile(d_hold, [0.01, 0.05, 0.5]).tolist(),
        },
        "_plots": {
            "marginals": _marginal_plot_data(
                [histogram(rc[:, j], d.size) for j, d in enumerate(domains)],
                [histogram(sc[:, j], d.size) for j, d in enumerate(domains)],
                domains,
            ),
            "sizes": sizes,
        },
    }


def researcher_report(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    domains: Sequence[Domain],
    context: dict[str, Any],
    epsilon: float,
) -> dict[str, Any]:
    """The researcher-facing report: the real side only through ε-DP noisy histograms (OpenDP Laplace).

    One row changes one cell of each of the ``k`` histograms (every column and every column pair), so the
    concatenated counts have L1 sensitivity ``k`` and get Laplace noise of scale ``k / ε``.
    """
    import opendp.prelude as dp

    dp.enable_features("contrib", "floating-point")
    rc, sc = encode(real, domains), encode(synthetic, domains)
    sizes = [d.size for d in domains]
    pairs = list(itertools.combinations(range(len(domains)), 2))
    exact = [histogram(rc[:, j], sizes[j]) for j in range(len(domains))] + [
        pair_table(rc, i, j, sizes).ravel() for i, j in pairs
    ]
    k = len(exact)
    meas = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float), scale=k / epsilon
    )
    if meas.map(float(k)) > epsilon * (1 + 1e-9):  # OpenDP's own accounting must agree with ours
        raise DCRError("internal error: the report's noise does not meet its budget")
    flat = np.asarray(meas(np.concatenate(exact).tolist()), dtype=float)
    del exact  # from here on, only the noisy counts describe the real data
    noisy, pos = [], 0
    for n in [*sizes, *(sizes[i] * sizes[j] for i, j in pairs)]:
        noisy.append(flat[pos : pos + n])
        pos += n
    scale = k / epsilon
    rng = np.random.default_rng()  # simulation of public noise only: no secret, no need to repeat
    marg, marg_unc = {}, {}
    for j, d in enumerate(domains):
        syn = histogram(sc[:, j], d.size)
        null = syn / max(syn.sum(), 1.0) * max(float(np.clip(noisy[j], 0, None).sum()), 1.0)
        unc = noisy_statistic(partial(_tvd_against, syn), noisy[j], null, scale, rng)
        marg[d.name] = unc["value"]
        marg_unc[d.name] = {key: unc[key] for key in ("interval", "noise_dominates", "noise_floor")}
    assoc = []
    for p, (i, j) in enumerate(pairs):
        table = noisy[len(domains) + p].reshape(sizes[i], sizes[j])
        clipped = np.clip(table, 0, None)
        null = np.outer(clipped.sum(axis=1), clipped.sum(axis=0)) / max(float(clipped.sum()), 1.0)
        unc = noisy_statistic(cramers_v_batch, table, null, scale, rng)
        vs = cramers_v(pair_table(sc, i, j, sizes))
        dominated = unc["noise_dominates"]
        assoc.append(
            {
                "columns": [domains[i].name, domains[j].name],
                "real_dp": unc["value"],
                "real_dp_interval": unc["interval"],
                "noise_dominates": dominated,
                "noise_floor": unc["noise_floor"],
                "synthetic": vs,
                "difference": None if dominated else abs(unc["value"] - vs),
                "difference_interval": None if dominated else _distance_to(vs, unc["interval"]),
            }
        )
    return {
        "schema": REPORT_SCHEMA,
        "audience": RESEARCHERS,
        "notice": _NOTICE[RESEARCHERS],
        **context,
        "report_epsilon": epsilon,
        "noise": {
            "mechanism": "Laplace (OpenDP)",
            "histograms": k,
            "scale": scale,
            "description": "every real count here carries Laplace noise of this scale (typical error ±scale)",
            "interval_level": INTERVAL_LEVEL,
            "noise_level": NOISE_LEVEL,
            "uncertainty": "each statistic of the real side comes with an approximate "
            f"{INTERVAL_LEVEL:.0%} interval simulated from the noise scale; where the statistic does not "
            f"exceed what noise alone gives ({NOISE_LEVEL:.1%} quantile: noise_floor), noise dominates and "
            "no value is given",
        },
        "rows": {"synthetic": len(synthetic)},
        "domains": [d.to_json() for d in domains],
        "marginal_distance": marg,
        "marginal_distance_uncertainty": marg_unc,
        "association": assoc,
        "utility": {
            "note": "not available: a utility check needs real rows; it is in the provider-only report"
        },
        "_plots": {
            "marginals": _marginal_plot_data(
                noisy[: len(domains)], [histogram(sc[:, j], d.size) for j, d in enumerate(domains)], domains
            ),
            "sizes": sizes,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_label = "real (DP noisy)" if report["audience"] == RESEARCHERS else "real"
    out = []
    margs = report["_plots"]["marginals"]
    ncols = 2
    nrows = (len(margs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(11, 3.2 * nrows), squeeze=False)
    for ax, m in zip(axes.ravel(), margs, strict=False):
        x = np.arange(len(m["labels"]))
        ax.bar(x - 0.2, m["real"], width=0.4, label=real_label, color="#4c72b0")
        ax.bar(x + 0.2, m["synthetic"], width=0.4, label="synthetic", color="#dd8452")
        dist = report["marginal_distance"][m["column"]]
        shown = "below the noise" if dist is None else f"distance {dist:.3f}"
        ax.set_title(f"{m['column']} ({shown})", fontsize=10)
        ax.set_xticks(x, m["labels"], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(margs) :]:
        ax.axis("off")
    fig.tight_layout()
    out.append(("Per-column distributions", _png(fig)))
    plt.close(fig)
    names = [d["column"] for d in report["domains"]]
    if len(names) > 1:
        real_key = "real_dp" if report["audience"] == RESEARCHERS else "real"
        idx = {n: i for i, n in enumerate(names)}
        mats = {key: np.eye(len(names)) for key in (real_key, "synthetic", "difference")}
        mats["difference"] = np.zeros((len(names), len(names)))
        for a in report["association"]:
            i, j = idx[a["columns"][0]], idx[a["columns"][1]]
            for key in mats:  # a value noise dominates is left blank (NaN)
                mats[key][i, j] = mats[key][j, i] = np.nan if a[key] is None else a[key]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, (key, title) in zip(
            axes,
            ((real_key, real_label), ("synthetic", "synthetic"), ("difference", "|difference|")),
            strict=True,
        ):
            im = ax.imshow(mats[key], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"Cramér's V: {title}", fontsize=10)
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        out.append(("Pairwise association", _png(fig)))
        plt.close(fig)
    return out


def _html(report: dict[str, Any]) -> str:
    e = html.escape
    title = f"DCR fidelity report: {report.get('file', '')} ({report['audience']})"
    uncertain = report.get("marginal_distance_uncertainty", {})
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_shown(dist, uncertain.get(name), 4)}</td></tr>"
        for name, dist in report["marginal_distance"].items()
    )
    # Largest differences first; pairs whose real side noise dominates last (they have no difference).
    assoc = sorted(report["association"], key=lambda a: (a["difference"] is None, -(a["difference"] or 0.0)))
    real_key = "real_dp" if report["audience"] == RESEARCHERS else "real"
    level = report.get("noise", {}).get("interval_level")
    dist_head = "distance" if level is None else f"distance [{level:.0%} interval]"
    real_head = "real" if level is None else f"real, DP [{level:.0%} interval]"
    arows = "".join(
        f"<tr><td>{e(a['columns'][0])} × {e(a['columns'][1])}</td>"
        f"<td>{_shown(a[real_key], _uncertainty(a, 'real_dp_interval'), 3)}</td>"
        f"<td>{a['synthetic']:.3f}</td>"
        f"<td>{_shown(a['difference'], _uncertainty(a, 'difference_interval'), 3)}</td></tr>"
        for a in assoc[:15]
    )
    budget = "".join(
        f"<tr><td>{e(str(b['purpose']))}</td><td>{b['epsilon']:.4g}</td><td>{b['delta']:.3g}</td></tr>"
        for b in report.get("budget", [])
    )
    util = report["utility"]
    if "trained_on_real" in util:
        util_html = (
            f"<p>Target <b>{e(util['target'])}</b>, {e(util['model'])}, {e(util['metric'])} on "
            f"{util['holdout_rows']} held-back real rows: trained on real {util['trained_on_real']:.3f}, trained "
            f"on synthetic {util['trained_on_synthetic']:.3f}.</p><p>{e(util.get('note', ''))}</p>"
        )
    else:
        util_html = f"<p>{e(util.get('note', ''))}</p>"
    plots = "".join(
        f"<h2>{e(t)}</h2><img alt='{e(t)}' src='data:image/png;base64,{img}'>" for t, img in _plots(report)
    )
    color = "#b00020" if report["audience"] == PROVIDER else "#1b5e20"
    eps = report.get("epsilon")
    protection = f"{e(str(report.get('mechanism')))}" + (
        f", ε = {eps:g}, δ = {report.get('delta'):g}" if eps else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        f".notice{{border:3px solid {color};padding:.6em;font-weight:bold;color:{color}}}</style></head><body>"
        f"<h1>{e(title)}</h1><p class='notice'>Audience: {e(report['audience'])}. {e(report['notice'])}</p>"
        f"<p>Protection: {protection}.</p>"
        + (
            f"<h2>Privacy budget</h2><table><tr><th>use</th><th>ε</th><th>δ</th></tr>{budget}</table>"
            if budget
            else ""
        )
        + "<h2>Marginal distance per column</h2><p>Total variation distance over the column's domain "
        "(0 = same distribution, 1 = disjoint).</p>"
        + (f"<p>{e(report['noise']['uncertainty'])}.</p>" if "noise" in report else "")
        + f"<table><tr><th>column</th><th>{dist_head}</th></tr>{rows}</table>"
        "<h2>Association differences (largest first)</h2>"
        f"<table><tr><th>pair</th><th>{real_head}</th><th>synthetic</th><th>|difference|</th></tr>{arows}</table>"
        f"<h2>Utility</h2>{util_html}{plots}</body></html>"
    )


def _uncertainty(entry: dict[str, Any], interval_key: str) -> dict[str, Any] | None:
    if "noise_dominates" not in entry:  # the provider-only report: exact statistics
        return None
    return {
        "interval": entry[interval_key],
        "noise_dominates": entry["noise_dominates"],
        "noise_floor": entry["noise_floor"],
    }


def _shown(value: float | None, uncertainty: dict[str, Any] | None, digits: int) -> str:
    """A statistic for the HTML page: the number, its interval, or that noise dominates it."""
    if uncertainty is None:
        return f"{value:.{digits}f}"
    if uncertainty["noise_dominates"] or value is None:
        return f"noise dominates (noise alone reaches {uncertainty['noise_floor']:.{digits}f}): no estimate"
    lo, hi = uncertainty["interval"]
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report_stem(report: dict[str, Any]) -> str:
    base = Path(str(report.get("file", "table"))).stem
    return f"{base}.fidelity-{report['audience']}"


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``<file>.fidelity-<audience>.json`` and ``.html`` into ``out_dir``; returns their paths."""
    stem = report_stem(report)
    doc = {k: v for k, v in report.items() if not k.startswith("_")}
    json_path, html_path = out_dir / f"{stem}.json", out_dir / f"{stem}.html"
    _atomic_write(json_path, (json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode())
    _atomic_write(html_path, _html(report).encode())
    return [json_path, html_path]
