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
import re
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol

import numpy as np
import pandas as pd

from dcr_enclave.formats.errors import DCRError

from .domain import Domain, declared_domain, decode, encode, estimate_categories, estimate_numeric
from .schema import TableSchema, load_schema
from .tables import read_table, table_format, write_table

#: Share of the budget left after the report that estimates undeclared domains.
DOMAIN_SHARE: Final = 0.1
#: δ when none is given; must stay well below 1/rows (checked).
DEFAULT_DELTA: Final = 1e-6
_EPSILON_HINT: Final = "give the total privacy loss, e.g. --epsilon 1; smaller is more private"
#: Rows drawn by ``random`` when the schema does not say.
DEFAULT_RANDOM_ROWS: Final = 1000
#: The smallest ε a mechanism is left with after the report and domain estimates.
MIN_MECHANISM_EPSILON: Final = 0.01
#: Where the progress fraction stands when a library fit starts, and when sampling its model starts.
FIT_START: Final = 0.1
SAMPLE_START: Final = 0.8
#: Seconds between redraws of the elapsed time while a library fit runs.
FIT_TICK_SECONDS: Final = 0.5
#: Seeds are below 2**32: numpy's global generator (which SmartNoise uses) and scikit-learn's
#: ``random_state`` accept nothing larger, and a drawn seed must be one a provider could pass as ``--seed``.
SEED_LIMIT: Final = 2**32


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer in ``[0, SEED_LIMIT)``; a :class:`DCRError` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < SEED_LIMIT:
        raise DCRError(
            f"--seed must be a whole number from 0 to {SEED_LIMIT - 1}, not {seed!r}", hint="e.g. --seed 7"
        )
    return int(seed)


def draw_seed() -> int:
    """A fresh seed in the range :func:`check_seed` accepts."""
    return secrets.randbelow(SEED_LIMIT)


class Progress(Protocol):
    """``progress(stage, fraction, detail)``: a short stage name, 0 to 1, and an optional detail line."""

    def __call__(self, stage: str, fraction: float, detail: str = "") -> None: ...


def _no_progress(stage: str, fraction: float, detail: str = "") -> None:
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
        rng_seed = check_seed(seed) if seed is not None else draw_seed()
        tick = progress or _no_progress
        declared = load_schema(schema) if schema is not None else None
        tick("reading", 0.0)
        df, table_schema = read_table(real, declared, max_bytes)
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


def _number(value: Any, what: str, hint: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise DCRError(f"{what} must be a finite number, not {value!r}", hint=hint)
    return float(value)


def plan_budget(
    schema: TableSchema, epsilon: float, delta: float, report_epsilon: float | None, rows: int
) -> tuple[float | None, dict[str, tuple[float, float]], float, float]:
    """Split ``(epsilon, delta)``: report ε, per-column domain estimates, and the mechanism's (ε, δ)."""
    if not epsilon > 0:
        raise DCRError(f"ε (--epsilon) must be positive, not {epsilon!r}", hint=_EPSILON_HINT)
    if not 0 < delta < 1:
        raise DCRError(
            f"δ (--delta) must be in (0, 1) for these mechanisms, not {delta!r}",
            hint="pass --delta, e.g. 1e-6",
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


_AIM_ROUND: Final = re.compile(r"Budget Used\s+([0-9.eE+-]+)")


class _FitProgress(io.TextIOBase):
    """Progress of a library fit, which offers no callback: the step its verbose output names, and the time.

    The library's standard output comes here and goes nowhere else; ``parse`` turns a line into a step name
    and a fraction (MST names its phases, AIM the share of the budget spent after each round). A thread
    redraws the step with the elapsed time every :data:`FIT_TICK_SECONDS`, so a terminal shows a long fit
    is alive between steps.
    """

    def __init__(self, tick: Progress, stage: str, parse: Callable[[str], tuple[str, float] | None]) -> None:
        self._tick, self._stage, self._parse = tick, stage, parse
        self._what, self._fraction = "starting", FIT_START
        self._pending = ""
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcr-fit-progress", daemon=True)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            found = self._parse(line.strip())
            if found is not None:
                self.step(*found)
        return len(text)

    def step(self, what: str, fraction: float) -> None:
        self._what, self._fraction = what, fraction
        self._draw()

    def _draw(self) -> None:
        with self._lock:
            elapsed = time.monotonic() - self._start
            self._tick(self._stage, self._fraction, f"{self._what}, {elapsed:.0f} s")

    def _run(self) -> None:
        while not self._stop.wait(FIT_TICK_SECONDS):
            self._draw()

    def __enter__(self) -> _FitProgress:
        self._draw()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


class _MarginalMechanism(Synthesizer):
    kind = "dp"

    def _fit_sample(
        self,
        codes: np.ndarray,
        sizes: Sequence[int],
        epsilon: float,
        delta: float,
        seed: int,
        tick: Progress = _no_progress,
    ) -> np.ndarray:
        from snsynth.transform.bin import BinTransformer
        from snsynth.transform.table import TableTransformer

        frame = pd.DataFrame(codes, columns=[f"c{j}" for j in range(codes.shape[1])])
        # Each code is its own bin: the domain is fixed here, so SmartNoise learns nothing from the data.
        transformer = TableTransformer([BinTransformer(bins=k, lower=-0.5, upper=k - 0.5) for k in sizes])
        model = self._model(epsilon, delta)
        np.random.seed(check_seed(seed))  # SmartNoise selects and samples with numpy's global generator
        with (
            _FitProgress(tick, f"fitting {self.name}", self._steps()) as log,
            contextlib.redirect_stdout(log),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            model.fit(frame, transformer=transformer)
            model.synthesizer = _IidSampling(model.synthesizer)
            log.step("sampling", SAMPLE_START)
            sample = model.sample(len(frame))
        out = np.rint(np.asarray(sample, dtype=float)).astype(np.int64)
        return np.clip(out, 0, np.asarray(sizes) - 1)

    def _model(self, epsilon: float, delta: float) -> Any:
        """The SmartNoise synthesizer, with ``verbose=True`` so that :meth:`_steps` can follow its fit."""
        raise NotImplementedError

    def _steps(self) -> Callable[[str], tuple[str, float] | None]:
        """For one fit: the step (name, progress fraction) a line of the library's output announces, if any."""
        return lambda line: None

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
        epsilon = _number(epsilon, "ε (--epsilon)", _EPSILON_HINT)
        dlt = self._delta(delta, len(df))
        eps_report, per_column, eps_mech, delta_mech = plan_budget(
            schema, epsilon, dlt, report_epsilon, len(df)
        )
        tick("domains", 0.05)
        domains, spends = build_domains(df, schema, per_column)
        codes = encode(df, domains)
        synthetic = self._fit_sample(codes, [d.size for d in domains], eps_mech, delta_mech, seed, tick)
        spends.append(Spend(f"{self.name} mechanism", eps_mech, delta_mech))
        if eps_report is not None:
            spends.append(Spend("researcher-facing fidelity report", eps_report, 0.0))
        return domains, spends, len(df), synthetic, eps_report


class MSTSynthesizer(_MarginalMechanism):
    """MST (McKenna et al.) through SmartNoise Synth; (ε, δ)-DP."""

    name = "mst"

    def _model(self, epsilon: float, delta: float) -> Any:
        from snsynth.mst import MSTSynthesizer as _MST

        return _MST(epsilon=epsilon, delta=delta, verbose=True)

    def _steps(self) -> Callable[[str], tuple[str, float] | None]:
        # MST measures the 1-way marginals, selects a tree of 2-way ones (1,000 iterations of mirror
        # descent), measures them, then estimates the model (5,000 iterations): weights by iteration count.
        def step(line: str) -> tuple[str, float] | None:
            if line.startswith("Getting cliques"):
                return "measuring and selecting marginals", FIT_START
            if line.startswith("Estimating marginals"):
                return "estimating the model", FIT_START + (SAMPLE_START - FIT_START) / 6
            return None

        return step


class AIMSynthesizer(_MarginalMechanism):
    """AIM (McKenna et al.) through SmartNoise Synth; (ε, δ)-DP, slower than MST, often more faithful."""

    name = "aim"

    def _model(self, epsilon: float, delta: float) -> Any:
        from snsynth.aim import AIMSynthesizer as _AIM

        return _AIM(epsilon=epsilon, delta=delta, verbose=True)

    def _steps(self) -> Callable[[str], tuple[str, float] | None]:
        # AIM runs rounds until its budget is spent, and says after each how much of it is used.
        rounds = 0

        def step(line: str) -> tuple[str, float] | None:
            nonlocal rounds
            spent = _AIM_ROUND.search(line)
            if spent:
                rounds += 1
                used = min(1.0, max(0.0, float(spent.group(1))))
                span = 0.9 * (SAMPLE_START - FIT_START)
                return f"round {rounds}, {used:.0%} of the budget spent", FIT_START + span * used
            if line.startswith("Estimating marginals"):
                return "estimating the model", FIT_START + 0.9 * (SAMPLE_START - FIT_START)
            return None

        return step


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
