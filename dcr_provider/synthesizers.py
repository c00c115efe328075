"""The synthesizers behind ``dcr provider add --synthesize NAME`` (entry-point group ``dcr.synthesizers``).

- ``mst`` and ``aim``: differentially private marginal mechanisms from SmartNoise Synth (MST: the maximum
  spanning tree of 2-way marginals, winner of the 2018 NIST challenge; AIM: adaptive, workload-aware marginal
  selection). DCR writes no DP mechanism of its own: it encodes the table to codes over declared or
  DP-estimated domains (:mod:`dcr_provider.domain`), hands the codes to the library, and decodes its sample.
- ``random``: every value drawn uniformly from the declared schema alone; the real data is read only to check
  that it fits that schema.

Budget. ``--epsilon``/``--delta`` are the *total* privacy loss of everything researchers get; basic
composition splits them into the researcher-facing fidelity report (``--report-epsilon``), the DP estimates of
undeclared domains (:data:`DOMAIN_SHARE` of the rest, split evenly over those columns; half of δ when a
category set is estimated) and the mechanism (the remainder). Neighbouring tables differ by one row added or
removed, as in the libraries; the row count itself is public (the manifest's file sizes reveal it anyway).

Seeds fix selection and sampling; the noise always comes from OpenDP's secure generator, so no run can be
replayed bit for bit — on purpose.
"""

from __future__ import annotations

import contextlib
import io
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import pandas as pd

from dcr_enclave.errors import DCRError

from .domain import Domain, declared_domain, decode, encode, estimate_categories, estimate_numeric
from .schema import TableSchema, load_schema
from .tables import read_table, table_format, write_table

#: Share of the budget left after the report that estimates undeclared domains.
DOMAIN_SHARE: Final = 0.1
#: δ when none is given; must stay well below 1/rows (checked).
DEFAULT_DELTA: Final = 1e-6
#: Rows drawn by ``random`` when the schema does not say.
DEFAULT_RANDOM_ROWS: Final = 1000
#: The smallest ε a mechanism is left with after the report and domain estimates.
MIN_MECHANISM_EPSILON: Final = 0.01

Progress = Callable[[str, float], None]


def _no_progress(stage: str, fraction: float) -> None:
    return None


@dataclass(frozen=True)
class Spend:
    """One use of the budget."""

    purpose: str
    epsilon: float
    delta: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"purpose": self.purpose, "epsilon": self.epsilon, "delta": self.delta}


@dataclass(frozen=True)
class SynthesisResult:
    """What a synthesizer made; ``kind``, ``mechanism``, ``epsilon`` and ``delta`` go into the manifest."""

    path: Path
    kind: str
    mechanism: str
    epsilon: float | None
    delta: float | None
    rows: int
    schema: TableSchema
    domains: tuple[Domain, ...]
    spends: tuple[Spend, ...] = ()
    #: Report files written beside ``path`` (provider-only and, with a report budget, researcher-facing).
    reports: tuple[Path, ...] = field(default=())


class Synthesizer:
    """Base of DCR's synthesizers: read, encode over domains, generate codes, decode, write, report."""

    name: ClassVar[str]
    kind: ClassVar[str]  # the manifest's protection kind: "dp" or "random"

    def synthesize(
        self,
        *,
        real: Path,
        out_dir: Path,
        epsilon: float | None = None,
        delta: float | None = None,
        schema: Path | None = None,
        seed: int | None = None,
        max_bytes: int = 16 << 30,
        report: bool = False,
        report_epsilon: float | None = None,
        progress: Progress | None = None,
    ) -> SynthesisResult:
        """Write the synthetic version of ``real`` to ``out_dir/<real's name>`` (same format).

        With ``report``, also write the provider-only fidelity report; with ``report_epsilon``, a
        researcher-facing one from DP statistics too. Refusals raise :class:`DCRError`.
        """
        real = Path(real)
        fmt = table_format(real)
        if (Path(out_dir) / real.name).resolve() == real.resolve():
            raise DCRError(
                f"the synthetic file would overwrite the real file {real}", hint="choose another out_dir"
            )
        tick = progress or _no_progress
        declared = load_schema(schema) if schema is not None else None
        tick("reading", 0.0)
        df, table_schema = read_table(real, declared, max_bytes)
        rng_seed = seed if seed is not None else secrets.randbits(63)
        rng = np.random.default_rng(rng_seed)
        domains, spends, rows, codes, eps_report = self._generate(
            df, table_schema, epsilon, delta, report_epsilon, rng_seed, tick
        )
        tick("writing", 0.9)
        synthetic = decode(codes, domains, rng)
        out = Path(out_dir) / real.name
        write_table(synthetic, out, table_schema, fmt, like=real)
        reports: list[Path] = []
        if report or report_epsilon is not None:
            from . import fidelity

            tick("report", 0.95)
            context = {
                "file": real.name,
                "mechanism": self.name,
                "protection": self.kind,
                "epsilon": epsilon if self.kind == "dp" else None,
                "delta": self._delta(delta, len(df)) if self.kind == "dp" else None,
                "budget": [s.to_json() for s in spends],
            }
            if report:
                reports += fidelity.write_report(
                    fidelity.provider_report(df, synthetic, domains, table_schema, context, seed=rng_seed),
                    Path(out_dir),
                )
            if eps_report is not None:
                reports += fidelity.write_report(
                    fidelity.researcher_report(df, synthetic, domains, context, eps_report), Path(out_dir)
                )
        tick("done", 1.0)
        return SynthesisResult(
            path=out,
            kind=self.kind,
            mechanism=self.name,
            epsilon=epsilon if self.kind == "dp" else None,
            delta=self._delta(delta, len(df)) if self.kind == "dp" else None,
            rows=rows,
            schema=table_schema,
            domains=tuple(domains),
            spends=tuple(spends),
            reports=tuple(reports),
        )

    @staticmethod
    def _delta(delta: float | None, rows: int) -> float:
        return DEFAULT_DELTA if delta is None else float(delta)

    def _generate(
        self,
        df: pd.DataFrame,
        schema: TableSchema,
        epsilon: float | None,
        delta: float | None,
        report_epsilon: float | None,
        seed: int,
        tick: Progress,
    ) -> tuple[list[Domain], list[Spend], int, np.ndarray, float | None]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Differentially private marginal mechanisms (SmartNoise Synth)
# ---------------------------------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise DCRError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def plan_budget(
    schema: TableSchema, epsilon: float, delta: float, report_epsilon: float | None, rows: int
) -> tuple[float | None, dict[str, tuple[float, float]], float, float]:
    """Split ``(epsilon, delta)``: report ε, per-column domain estimates, and the mechanism's (ε, δ)."""
    if not epsilon > 0:
        raise DCRError(f"ε must be positive, not {epsilon!r}")
    if not 0 < delta < 1:
        raise DCRError(
            f"δ must be in (0, 1) for these mechanisms, not {delta!r}", hint="pass --delta, e.g. 1e-6"
        )
    if delta >= 1 / rows:
        raise DCRError(
            f"δ={delta:g} is not below 1/rows = {1 / rows:.3g}: that budget could publish whole rows",
            hint="pass a smaller --delta",
        )
    left = epsilon
    eps_report = None
    if report_epsilon is not None:
        eps_report = _number(report_epsilon, "--report-epsilon")
        if not 0 < eps_report < epsilon:
            raise DCRError(
                f"--report-epsilon {eps_report:g} must be positive and below --epsilon {epsilon:g}",
                hint="it is spent out of the total ε",
            )
        left -= eps_report
    undeclared = [c for c in schema.columns if not c.declared_domain]
    per_column: dict[str, tuple[float, float]] = {}
    mech_delta = delta
    if undeclared:
        eps_each = DOMAIN_SHARE * left / len(undeclared)
        cats = [c for c in undeclared if c.type == "categorical"]
        delta_each = (delta / 2) / len(cats) if cats else 0.0
        mech_delta = delta / 2 if cats else delta
        for c in undeclared:
            per_column[c.name] = (eps_each, delta_each if c.type == "categorical" else 0.0)
        left -= DOMAIN_SHARE * left
    if left < MIN_MECHANISM_EPSILON:
        raise DCRError(
            f"only ε={left:.3g} is left for the mechanism", hint="raise --epsilon or lower --report-epsilon"
        )
    return eps_report, per_column, left, mech_delta


def build_domains(
    df: pd.DataFrame, schema: TableSchema, per_column: dict[str, tuple[float, float]]
) -> tuple[list[Domain], list[Spend]]:
    """Declared domains, or DP estimates spending ``per_column[name]``."""
    domains, spends = [], []
    for spec in schema.columns:
        if spec.declared_domain:
            domains.append(declared_domain(spec))
            continue
        eps, dlt = per_column[spec.name]
        if spec.numeric:
            domains.append(estimate_numeric(spec, df[spec.name].to_numpy(dtype=float, na_value=np.nan), eps))
        else:
            domains.append(estimate_categories(spec, df[spec.name].tolist(), eps, dlt))
        spends.append(Spend(f"domain of {spec.name}", eps, dlt))
    return domains, spends


class _IidSampling:
    """The fitted graphical model, sampling rows i.i.d. from it.

    SmartNoise samples with mbi's default "round" method, which in mbi 1.1 ties unrelated columns together
    (on the insurance data, Cramér's V of sex × bmi came out 0.83 where the model says 0.09); "sample" draws
    each row from the model's distribution. Sampling is post-processing: the privacy guarantee is unchanged.
    """

    def __init__(self, model: Any) -> None:
        self._model = model

    def synthetic_data(self, rows: int | None = None) -> Any:
        return self._model.synthetic_data(rows=rows, method="sample")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _MarginalMechanism(Synthesizer):
    kind = "dp"

    def _fit_sample(
        self, codes: np.ndarray, sizes: Sequence[int], epsilon: float, delta: float, seed: int
    ) -> np.ndarray:
        from snsynth.transform.bin import BinTransformer
        from snsynth.transform.table import TableTransformer

        frame = pd.DataFrame(codes, columns=[f"c{j}" for j in range(codes.shape[1])])
        # Each code is its own bin: the domain is fixed here, so SmartNoise learns nothing from the data.
        transformer = TableTransformer([BinTransformer(bins=k, lower=-0.5, upper=k - 0.5) for k in sizes])
        model = self._model(epsilon, delta)
        np.random.seed(seed % 2**32)  # SmartNoise selects and samples with numpy's global generator
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(frame, transformer=transformer)
            model.synthesizer = _IidSampling(model.synthesizer)
            sample = model.sample(len(frame))
        out = np.rint(np.asarray(sample, dtype=float)).astype(np.int64)
        return np.clip(out, 0, np.asarray(sizes) - 1)

    def _model(self, epsilon: float, delta: float) -> Any:
        raise NotImplementedError

    def _generate(
        self,
        df: pd.DataFrame,
        schema: TableSchema,
        epsilon: float | None,
        delta: float | None,
        report_epsilon: float | None,
        seed: int,
        tick: Progress,
    ) -> tuple[list[Domain], list[Spend], int, np.ndarray, float | None]:
        if epsilon is None:
            raise DCRError(f"--synthesize {self.name} needs --epsilon", hint="e.g. --epsilon 1")
        epsilon = _number(epsilon, "ε")
        dlt = self._delta(delta, len(df))
        eps_report, per_column, eps_mech, delta_mech = plan_budget(
            schema, epsilon, dlt, report_epsilon, len(df)
        )
        tick("domains", 0.05)
        domains, spends = build_domains(df, schema, per_column)
        codes = encode(df, domains)
        tick(f"fitting {self.name}", 0.1)
        synthetic = self._fit_sample(codes, [d.size for d in domains], eps_mech, delta_mech, seed)
        spends.append(Spend(f"{self.name} mechanism", eps_mech, delta_mech))
        if eps_report is not None:
            spends.append(Spend("researcher-facing fidelity report", eps_report, 0.0))
        return domains, spends, len(df), synthetic, eps_report


class MSTSynthesizer(_MarginalMechanism):
    """MST (McKenna et al.) through SmartNoise Synth; (ε, δ)-DP."""

    name = "mst"

    def _model(self, epsilon: float, delta: float) -> Any:
        from snsynth.mst import MSTSynthesizer as _MST

        return _MST(epsilon=epsilon, delta=delta)


class AIMSynthesizer(_MarginalMechanism):
    """AIM (McKenna et al.) through SmartNoise Synth; (ε, δ)-DP, slower than MST, often more faithful."""

    name = "aim"

    def _model(self, epsilon: float, delta: float) -> Any:
        from snsynth.aim import AIMSynthesizer as _AIM

        return _AIM(epsilon=epsilon, delta=delta)


# ---------------------------------------------------------------------------------------------------------
# Random: the declared schema alone
# ---------------------------------------------------------------------------------------------------------


class RandomSynthesizer(Synthesizer):
    """Uniform draws from the declared domains; the real data only has to fit the schema."""

    name = "random"
    kind = "random"

    def _generate(
        self,
        df: pd.DataFrame,
        schema: TableSchema,
        epsilon: float | None,
        delta: float | None,
        report_epsilon: float | None,
        seed: int,
        tick: Progress,
    ) -> tuple[list[Domain], list[Spend], int, np.ndarray, float | None]:
        if epsilon is not None or delta is not None or report_epsilon is not None:
            raise DCRError(
                "--synthesize random reads nothing from the data, so it takes no --epsilon, --delta or "
                "--report-epsilon"
            )
        if not schema.declared:
            raise DCRError(
                "--synthesize random needs --schema", hint="declare every column's type and domain"
            )
        undeclared = [c.name for c in schema.columns if not c.declared_domain]
        if undeclared:
            raise DCRError(
                f"--synthesize random needs a declared domain for every column; {undeclared[0]!r} has none",
                hint="give min and max (numbers) or categories (text) in --schema",
            )
        domains = [declared_domain(c) for c in schema.columns]
        rows = schema.rows or DEFAULT_RANDOM_ROWS
        rng = np.random.default_rng([seed, 1])
        codes = np.column_stack([rng.integers(0, d.size, rows) for d in domains])
        return domains, [], rows, codes, None
