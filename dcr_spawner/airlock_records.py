"""The airlock's records in the hub's DCR database: the held jobs it received and each reviewer's decision.

Tables beside the hub's other DCR records (:mod:`dcr_spawner.hubdb`, same ``Base``, created with them):

- ``dcr_hub_airlock``: one row per held job (or failed run's sealed detail) the airlock received: its
  owner, datasets and providers, the receipt's public findings, the status and the decision's comment;
- ``dcr_hub_reviews``: one row per reviewer's decision on a job, with the providers it counted for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from .hubdb import Base


class HeldRecord(Base):
    """A held job the airlock received."""

    __tablename__ = "dcr_hub_airlock"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    grant_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(255), index=True)
    received_at: Mapped[int] = mapped_column(BigInteger, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    #: sha256 of receipt.json: a second delivery must be the same receipt.
    receipt_digest: Mapped[str] = mapped_column(String(80))
    #: JSON list of ``[ref, version, release]``.
    datasets: Mapped[str] = mapped_column(Text)
    #: JSON list of provider keys whose reviewers decide.
    providers: Mapped[str] = mapped_column(Text)
    #: JSON ``{"violations": [...], "disclosure": [...]}``: the public kinds from the receipt.
    findings: Mapped[str] = mapped_column(Text, default="{}")
    notebook: Mapped[str] = mapped_column(Text, default="")
    decided_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    #: ``outputs`` (a held job's outputs, checked against its receipt) or ``failure`` (a failed run's sealed
    #: detail, which no receipt attests: the researcher may see it only once reviewers release it).
    kind: Mapped[str] = mapped_column(String(16), default="outputs")


class ReviewRecord(Base):
    """One reviewer's decision on a held job."""

    __tablename__ = "dcr_hub_reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("dcr_hub_airlock.job_id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(255))
    decision: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[int] = mapped_column(BigInteger)
    #: JSON list of the job's providers this reviewer could review when deciding (their approval counts
    #: for those).
    providers: Mapped[str] = mapped_column(Text, default="[]")

    __table_args__ = (UniqueConstraint("job_id", "reviewer", name="uq_dcr_hub_reviews_job_reviewer"),)


@dataclass(frozen=True)
class Review:
    reviewer: str
    decision: str
    comment: str
    at: int
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeldJob:
    """A held job as the airlock's pages and the researcher's server see it (never its outputs)."""

    job_id: str
    grant_id: str
    user: str
    received_at: int
    status: str
    datasets: tuple[tuple[str, str, str], ...]
    providers: tuple[str, ...]
    findings: dict[str, list[str]]
    notebook: str
    decided_at: int | None
    comment: str
    reviews: tuple[Review, ...]
    kind: str = "outputs"

    @property
    def approvers(self) -> list[str]:
        return [r.reviewer for r in self.reviews if r.decision == "approve"]


def held_job(row: HeldRecord, reviews: list[Review]) -> HeldJob:
    return HeldJob(
        job_id=row.job_id,
        grant_id=row.grant_id,
        user=row.user,
        received_at=row.received_at,
        status=row.status,
        datasets=tuple((str(a), str(b), str(c)) for a, b, c in json.loads(row.datasets)),
        providers=tuple(json.loads(row.providers)),
        findings=json.loads(row.findings or "{}"),
        notebook=row.notebook,
        decided_at=row.decided_at,
        comment=row.comment,
        reviews=tuple(reviews),
        kind=row.kind or "outputs",
    )
