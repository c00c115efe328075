"""The hub's periodic sweep of its cloud jobs: zero orphans, ends recorded, across hub restarts.

Each pass (every ``c.ConfidentialSpacePlatform.reconcile_interval`` seconds, and once when the hub starts):

1. list the instances labelled ``dcr-hub=<this hub>``; delete every one without a live launch record (its
   job ended, or it was never recorded: a record is always written before the insert, so such a VM is no
   job's) and every one past its job's deadline (the job is recorded failed);
2. read every live launch's state (:meth:`CloudJobs.refresh`): a completion object, a VM that vanished
   or stopped, or a deadline passed ends the record and deletes the VM, so quotas free without a researcher's
   server watching.

Compute's ``maxRunDuration`` deletes a VM at its deadline even when no hub runs at all.
"""

from __future__ import annotations

from typing import Any

from .jobs import CloudJobs


def reconcile(jobs: CloudJobs) -> dict[str, int]:
    """One pass; returns counts (``deleted`` orphans, ``expired`` jobs, ``refreshed`` live jobs)."""
    counts = {"deleted": 0, "expired": 0, "refreshed": 0}
    vms = jobs.compute.list_labelled(jobs.hub)
    known = jobs.launches.by_instances([vm["name"] for vm in vms])
    now = jobs.clock()
    for vm in vms:
        launch = known.get(vm["name"])
        if launch is None or launch.ended:
            jobs.compute.delete(vm["name"])
            counts["deleted"] += 1
            if launch is None:
                jobs.db.audit(
                    "cloud.orphan_deleted",
                    status=200,
                    job_id=vm["labels"].get("dcr-job"),
                    reason="a VM labelled as this hub's with no launch record",
                    detail={"instance": vm["name"]},
                )
        elif now > launch.deadline:
            jobs.end_job(launch, "failed", "the job reached its time limit; the hub deleted its VM")
            counts["expired"] += 1
    for launch in jobs.launches.live():
        try:
            jobs.refresh(launch)
            counts["refreshed"] += 1
        except Exception as e:  # one job's storage or Compute error must not stop the sweep
            jobs.log.warning("DCR: reading cloud job %s failed: %s", launch.job_id, e)
    return counts


def run_logged(jobs: CloudJobs, log: Any) -> None:
    """One pass for the hub's periodic callback: every error logged, retried at the next interval."""
    try:
        counts = reconcile(jobs)
    except Exception:
        log.exception("DCR: the cloud reconciler's pass failed (retried at the next interval)")
        return
    if counts["deleted"] or counts["expired"]:
        log.info("DCR: cloud reconciler deleted %(deleted)d orphan VM(s), expired %(expired)d job(s)", counts)
