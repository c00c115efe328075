/**
 * The jobs panel's state handling (src/model.ts): records and events merged into one view per job,
 * ordering, progress, terminal states, unknown ids and out-of-order arrivals.
 */

import {
  EMPTY,
  IJobsState,
  JOB_STATES,
  JobsAction,
  TERMINAL_STATES,
  approvalsText,
  canCancel,
  decidedBy,
  elapsedMs,
  enclaveOutputNotebookPath,
  enclaveOutputOfCopy,
  enclaveRunOf,
  endedBy,
  executedCopyName,
  executedNotebookPath,
  failureOf,
  formatElapsed,
  hasOutputs,
  noticeOf,
  notificationsDue,
  orderedJobs,
  parseJobEvent,
  progressOf,
  reduce,
  reviewOf,
  reviewSummary,
  failureDetailOf,
  reviewersText
} from '../src/model';
import { IJob, IJobEvent, IJobReview, JobState } from '../src/types';

let counter = 0;

/** A job id that differs per call (job-<24 hex>). */
function newId(): string {
  counter += 1;
  return 'job-' + counter.toString(16).padStart(24, '0');
}

function record(id: string, overrides: Partial<IJob> = {}): IJob {
  return {
    id,
    notebook: 'work/analysis.ipynb',
    state: 'submitted',
    created: '2026-11-25T10:00:00.000Z',
    updated: '2026-11-25T10:00:00.000Z',
    bundle: { digest: 'sha256:' + 'a'.repeat(64), files: 2, bytes: 1234 },
    datasets: [{ provider: 'acme', dataset: 'insurance', version: null, release: null }],
    progress: null,
    failure: null,
    review: null,
    outputs_path: null,
    receipt: false,
    enclave: null,
    backend: 'LocalBackend',
    ...overrides
  };
}

function event(
  job_id: string,
  state: JobState,
  cell: number | null = null,
  cells: number | null = null
): IJobEvent {
  return { job_id, state, cell, cells, reason: null };
}

function run(actions: JobsAction[], start: IJobsState = EMPTY): IJobsState {
  return actions.reduce(reduce, start);
}

describe('records', () => {
  it('a listing creates one view per job, marks the state loaded and keeps the total', () => {
    const a = newId();
    const b = newId();
    const s = run([{ type: 'loaded', jobs: [record(a), record(b, { state: 'running' })], total: 7 }]);
    expect(s.loaded).toBe(true);
    expect(s.total).toBe(7);
    expect(Object.keys(s.byId).sort()).toEqual([a, b].sort());
    expect(s.byId[b].state).toBe('running');
    expect(s.byId[a].stale).toBe(false);
  });

  it('a failed listing keeps the jobs and the error, and the next listing clears the error', () => {
    const a = newId();
    let s = run([
      { type: 'loaded', jobs: [record(a)], total: 1 },
      { type: 'error', message: 'no such DCR API endpoint' }
    ]);
    expect(s.error).toBe('no such DCR API endpoint');
    expect(s.byId[a]).toBeDefined();
    s = reduce(s, { type: 'loaded', jobs: [], total: 1 });
    expect(s.error).toBeNull();
    expect(s.byId[a]).toBeDefined();
  });

  it('an action that changes nothing returns the same state object', () => {
    const a = newId();
    const job = record(a, { state: 'running', progress: { cell: 1, cells: 3 } });
    const s = run([{ type: 'loaded', jobs: [job], total: 1 }]);
    expect(reduce(s, { type: 'job', job })).toBe(s);
    expect(reduce(s, { type: 'loaded', jobs: [job], total: 1 })).toBe(s);
    expect(reduce(s, { type: 'event', event: event(a, 'running', 1, 3) })).toBe(s);
  });
});

describe('events', () => {
  it('move a job through the lifecycle with its cells', () => {
    const a = newId();
    let s = run([{ type: 'job', job: record(a) }]);
    const steps: [JobState, number | null, number | null][] = [
      ['granted', null, null],
      ['launching', null, null],
      ['running', null, null],
      ['running', 0, 3],
      ['running', 1, 3],
      ['running', 2, 3],
      ['checking', 2, 3]
    ];
    for (const [state, cell, cells] of steps) {
      s = reduce(s, { type: 'event', event: event(a, state, cell, cells) });
      expect(s.byId[a].state).toBe(state);
    }
    expect(s.byId[a].cell).toBe(2);
    expect(s.byId[a].cells).toBe(3);
    expect(progressOf(s.byId[a])).toEqual({ done: 3, total: 3, fraction: 1, label: '3 of 3 cells' });
  });

  it('never move a job backwards: a late, older event or listing is ignored', () => {
    const a = newId();
    let s = run([
      { type: 'job', job: record(a) },
      { type: 'event', event: event(a, 'running', 2, 5) }
    ]);
    // A listing fetched before those events arrives after them.
    s = reduce(s, { type: 'loaded', jobs: [record(a, { state: 'launching' })], total: 1 });
    expect(s.byId[a].state).toBe('running');
    expect(s.byId[a].cell).toBe(2);
    // Same state, older cell: the bar does not go back.
    s = reduce(s, { type: 'job', job: record(a, { state: 'running', progress: { cell: 1, cells: 5 } }) });
    expect(s.byId[a].cell).toBe(2);
    s = reduce(s, { type: 'event', event: event(a, 'granted') });
    expect(s.byId[a].state).toBe('running');
  });

  it('treat terminal states as final', () => {
    for (const terminal of TERMINAL_STATES) {
      const a = newId();
      let s = run([
        { type: 'job', job: record(a) },
        { type: 'event', event: event(a, terminal) }
      ]);
      expect(s.byId[a].state).toBe(terminal);
      for (const later of JOB_STATES) {
        s = reduce(s, { type: 'event', event: event(a, later, 4, 9) });
        expect(s.byId[a].state).toBe(terminal);
      }
      expect(canCancel(s.byId[a])).toBe(false);
    }
  });

  it('let a held job be released or rejected', () => {
    const a = newId();
    const b = newId();
    let s = run([
      { type: 'event', event: event(a, 'held') },
      { type: 'event', event: event(b, 'held') }
    ]);
    expect(canCancel(s.byId[a])).toBe(false);
    s = run(
      [
        { type: 'event', event: event(a, 'released') },
        { type: 'event', event: event(b, 'rejected') }
      ],
      s
    );
    expect(s.byId[a].state).toBe('released');
    expect(s.byId[b].state).toBe('rejected');
  });

  it('keep a failure reason from the event', () => {
    const a = newId();
    const s = run([
      { type: 'job', job: record(a, { state: 'running', progress: { cell: 1, cells: 4 } }) },
      { type: 'event', event: { ...event(a, 'failed', 1, 4), reason: 'cell 2 raised ZeroDivisionError' } }
    ]);
    expect(s.byId[a].reason).toBe('cell 2 raised ZeroDivisionError');
    expect(progressOf(s.byId[a])).toMatchObject({ done: 1, total: 4, label: '1 of 4 cells' });
  });
});

describe('unknown ids and stale records', () => {
  it('an event for an unknown job creates a stale view that the fetched record completes', () => {
    const a = newId();
    let s = reduce(EMPTY, { type: 'event', event: event(a, 'running', 0, 2) });
    expect(s.byId[a].job).toBeNull();
    expect(s.byId[a].stale).toBe(true);
    expect(elapsedMs(s.byId[a], Date.now())).toBeNull();
    s = reduce(s, { type: 'job', job: record(a, { state: 'running', progress: { cell: 0, cells: 2 } }) });
    expect(s.byId[a].stale).toBe(false);
    expect(s.byId[a].job?.notebook).toBe('work/analysis.ipynb');
  });

  it('an ended job is stale until its record shows the end (outputs, receipt)', () => {
    const a = newId();
    let s = run([
      { type: 'job', job: record(a, { state: 'running' }) },
      { type: 'event', event: event(a, 'succeeded', 2, 3) }
    ]);
    expect(s.byId[a].stale).toBe(true);
    const done = record(a, {
      state: 'succeeded',
      outputs_path: `dcr-jobs/${a}`,
      receipt: true,
      progress: { cell: 2, cells: 3 }
    });
    s = reduce(s, { type: 'job', job: done });
    expect(s.byId[a].stale).toBe(false);
    expect(s.byId[a].job).toBe(done);
    expect(executedNotebookPath(done)).toBe(`dcr-jobs/${a}/analysis.enclave-${a.slice(4, 12)}.ipynb`);
    expect(enclaveOutputNotebookPath(done)).toBe(`dcr-jobs/${a}/outputs/analysis.ipynb`);
  });

  it('a job that is running is not stale even when its record is behind', () => {
    const a = newId();
    const s = run([
      { type: 'job', job: record(a, { state: 'granted' }) },
      { type: 'event', event: event(a, 'running', 0, 3) }
    ]);
    expect(s.byId[a].stale).toBe(false);
  });

  it('events that are not job events are refused by the parser', () => {
    expect(
      parseJobEvent({ job_id: 'job-' + 'a'.repeat(24), state: 'running', cell: 1, cells: 2, reason: null })
    ).toEqual({
      job_id: 'job-' + 'a'.repeat(24),
      state: 'running',
      cell: 1,
      cells: 2,
      reason: null
    });
    const bad = [
      null,
      'running',
      { job_id: 'job-1', state: 'running' },
      { job_id: 'job-' + 'a'.repeat(24), state: 'exploded' },
      { job_id: 'job-' + 'a'.repeat(24), state: 'running', cell: -1, cells: 2 },
      { job_id: 'job-' + 'a'.repeat(24), state: 'running', cell: 1.5, cells: 2 },
      { job_id: 'job-' + 'a'.repeat(24), state: 'running', cell: 1, cells: '2' }
    ];
    for (const data of bad) {
      expect(parseJobEvent(data)).toBeNull();
    }
  });
});

describe('ordering', () => {
  it('lists newest first, with jobs known only from events on top', () => {
    const old = newId();
    const recent = newId();
    const unknown = newId();
    const s = run([
      {
        type: 'loaded',
        jobs: [
          record(old, { created: '2026-11-25T09:00:00.000Z' }),
          record(recent, { created: '2026-11-25T11:00:00.000Z' })
        ],
        total: 2
      },
      { type: 'event', event: event(unknown, 'submitted') }
    ]);
    expect(orderedJobs(s).map(v => v.id)).toEqual([unknown, recent, old]);
  });

  it('breaks ties by id', () => {
    const a = newId();
    const b = newId();
    const s = run([{ type: 'loaded', jobs: [record(b), record(a)], total: 2 }]);
    expect(orderedJobs(s).map(v => v.id)).toEqual([a, b]);
  });
});

describe('notifications', () => {
  it('are due once, for the event that ends a job or sends it to review', () => {
    const a = newId();
    const b = newId();
    let s = run([{ type: 'job', job: record(a, { state: 'running' }) }]);
    const endA: JobsAction = { type: 'event', event: event(a, 'succeeded') };
    const after = reduce(s, endA);
    expect(endedBy(s, endA, after).map(v => v.id)).toEqual([a]);
    s = after;
    expect(endedBy(s, endA, reduce(s, endA))).toEqual([]);
    const review: JobsAction = { type: 'event', event: event(b, 'held') };
    expect(endedBy(s, review, reduce(s, review)).map(v => v.state)).toEqual(['held']);
    const running: JobsAction = { type: 'event', event: event(b, 'running', 0, 1) };
    expect(endedBy(s, running, reduce(s, running))).toEqual([]);
  });

  it('are not due for jobs that arrive ended in a listing', () => {
    const a = newId();
    const action: JobsAction = { type: 'loaded', jobs: [record(a, { state: 'failed' })], total: 1 };
    expect(endedBy(EMPTY, action, reduce(EMPTY, action))).toEqual([]);
  });
});

describe('progress and time', () => {
  it('counts executed cells while running', () => {
    const a = newId();
    let s = reduce(EMPTY, { type: 'event', event: event(a, 'running') });
    expect(progressOf(s.byId[a])).toBeNull();
    s = reduce(s, { type: 'event', event: event(a, 'running', 0, 4) });
    expect(progressOf(s.byId[a])).toEqual({ done: 0, total: 4, fraction: 0, label: 'cell 1 of 4' });
    s = reduce(s, { type: 'event', event: event(a, 'running', 3, 4) });
    expect(progressOf(s.byId[a])).toEqual({ done: 3, total: 4, fraction: 0.75, label: 'cell 4 of 4' });
  });

  it('measures elapsed time to now while running and to the last update once ended', () => {
    const a = newId();
    const created = Date.parse('2026-11-25T10:00:00.000Z');
    let s = reduce(EMPTY, { type: 'job', job: record(a, { state: 'running' }) });
    expect(elapsedMs(s.byId[a], created + 65_000)).toBe(65_000);
    s = reduce(s, {
      type: 'job',
      job: record(a, { state: 'succeeded', updated: '2026-11-25T10:00:42.500Z' })
    });
    expect(elapsedMs(s.byId[a], created + 999_000)).toBe(42_500);
    expect(elapsedMs(s.byId[a], created - 10_000)).toBe(42_500);
  });

  it('formats durations', () => {
    expect(formatElapsed(null)).toBe('–');
    expect(formatElapsed(7_900)).toBe('0:07');
    expect(formatElapsed(12 * 60_000 + 3_000)).toBe('12:03');
    expect(formatElapsed(3_723_000)).toBe('1:02:03');
  });
});

describe('the executed notebook: a name and a banner of its own', () => {
  const id = 'job-1a2b3c4d' + '0'.repeat(16);

  it('names the marked copy after the notebook and the job, never like the notebook itself', () => {
    expect(executedCopyName('work/analysis.ipynb', id)).toBe('analysis.enclave-1a2b3c4d.ipynb');
    expect(executedCopyName('my.study.ipynb', id)).toBe('my.study.enclave-1a2b3c4d.ipynb');
    const done = record(id, { state: 'succeeded', outputs_path: `dcr-jobs/${id}`, receipt: true });
    const path = executedNotebookPath(done) as string;
    expect(path).toBe(`dcr-jobs/${id}/analysis.enclave-1a2b3c4d.ipynb`);
    expect(path.split('/').pop()).not.toBe('analysis.ipynb');
    expect(executedNotebookPath(record(id, { state: 'running' }))).toBeNull();
  });

  it("finds the enclave's own notebook beside a marked copy, for jobs that ended before copies existed", () => {
    expect(enclaveOutputOfCopy(`dcr-jobs/${id}/analysis.enclave-1a2b3c4d.ipynb`)).toBe(
      `dcr-jobs/${id}/outputs/analysis.ipynb`
    );
    expect(enclaveOutputOfCopy(`${id}/a b.enclave-1a2b3c4d.ipynb`)).toBe(`${id}/outputs/a b.ipynb`);
    // the hex must be the job's, and only marked copies map
    expect(enclaveOutputOfCopy(`dcr-jobs/${id}/analysis.enclave-ffffffff.ipynb`)).toBeNull();
    expect(enclaveOutputOfCopy(`dcr-jobs/${id}/outputs/analysis.ipynb`)).toBeNull();
    expect(enclaveOutputOfCopy('analysis.ipynb')).toBeNull();
  });

  it('reads the enclave run from notebook metadata, and nothing else as one', () => {
    expect(enclaveRunOf({ dcr: { job_id: id, executed_in_enclave: true } })).toEqual({ jobId: id });
    expect(enclaveRunOf({ dcr: { job_id: id, executed_in_enclave: false } })).toBeNull();
    expect(enclaveRunOf({ dcr: { job_id: 'job-1', executed_in_enclave: true } })).toBeNull();
    expect(enclaveRunOf({ dcr: { job_id: '../x', executed_in_enclave: true } })).toBeNull();
    expect(enclaveRunOf({ dcr: undefined })).toBeNull();
    expect(enclaveRunOf({ kernelspec: {} })).toBeNull();
    expect(enclaveRunOf(null)).toBeNull();
    expect(enclaveRunOf('dcr')).toBeNull();
  });
});

function review(overrides: Partial<IJobReview> = {}): IJobReview {
  return {
    status: 'waiting',
    reviewers: ['Riverside Hospital'],
    required_approvals: 2,
    approvals: 1,
    comment: null,
    decided_at: null,
    note: null,
    ...overrides
  };
}

/** A state whose only job is `job`, as a first listing leaves it. */
function listed(job: IJob): IJobsState {
  return reduce(EMPTY, { type: 'loaded', jobs: [job], total: 1 });
}

describe('review', () => {
  it('names the reviewers and counts the approvals', () => {
    expect(reviewersText([])).toBe('the provider');
    expect(reviewersText(['Riverside Hospital'])).toBe('Riverside Hospital');
    expect(reviewersText(['A', 'B'])).toBe('A and B');
    expect(reviewersText(['A', 'B', 'C'])).toBe('A, B and C');
    expect(approvalsText({ approvals: 1, required_approvals: 2 })).toBe('1 of 2 approvals');
    expect(approvalsText({ approvals: 0, required_approvals: 1 })).toBe('0 of 1 approval');
  });

  it('a held job waiting in the airlock says who must review and how many approvals it has', () => {
    const a = newId();
    const s = listed(record(a, { state: 'held', review: review() }));
    expect(reviewSummary(s.byId[a])).toEqual({
      status: 'waiting',
      text: 'held for review by Riverside Hospital — 1 of 2 approvals',
      comment: null,
      decidedAt: null
    });
    const two = listed(
      record(a, {
        state: 'held',
        review: review({ reviewers: ['Riverside Hospital', 'Acme'], required_approvals: 1, approvals: 0 })
      })
    );
    expect(reviewSummary(two.byId[a])?.text).toBe(
      'held for review by Riverside Hospital and Acme — 0 of 1 approval'
    );
  });

  it('a held job not sent to the airlock says so, with the note', () => {
    const a = newId();
    const note = 'this server has no hub airlock (development grant source)';
    let s = listed(record(a, { state: 'held', review: review({ status: 'unsent', approvals: 0, note }) }));
    expect(reviewSummary(s.byId[a])).toMatchObject({
      status: 'unsent',
      text: `held, not yet sent for review — ${note}`
    });
    s = listed(record(a, { state: 'held', review: review({ status: 'unsent', note: null }) }));
    expect(reviewSummary(s.byId[a])?.text).toBe('held, not yet sent for review');
  });

  it('a held job without a review (no record yet, an older server) is held for the provider', () => {
    const a = newId();
    const s = reduce(EMPTY, { type: 'event', event: event(a, 'held') });
    expect(reviewOf(s.byId[a])).toBeNull();
    expect(reviewSummary(s.byId[a])).toEqual({
      status: null,
      text: 'held for the provider’s review',
      comment: null,
      decidedAt: null
    });
    // An older server's record has no review field at all.
    const old = record(a, { state: 'held' }) as Partial<IJob>;
    delete old.review;
    expect(reviewOf(listed(old as IJob).byId[a])).toBeNull();
  });

  it('a decision the server has not acted on yet shows while the job is still held', () => {
    const a = newId();
    let s = listed(record(a, { state: 'held', review: review({ status: 'released', approvals: 2 }) }));
    expect(reviewSummary(s.byId[a])).toMatchObject({
      status: 'released',
      text: 'approved by Riverside Hospital, opening the outputs'
    });
    s = listed(record(a, { state: 'held', review: review({ status: 'rejected', comment: 'no' }) }));
    expect(reviewSummary(s.byId[a])).toMatchObject({
      status: 'rejected',
      text: 'rejected in review by Riverside Hospital',
      comment: 'no'
    });
  });

  it('released and rejected jobs show the outcome, the comment and when it was decided', () => {
    const a = newId();
    const decided_at = '2026-12-06T21:00:00.000Z';
    const released = listed(
      record(a, {
        state: 'released',
        outputs_path: `dcr-jobs/${a}`,
        receipt: true,
        review: review({ status: 'released', approvals: 2, comment: 'fine', decided_at })
      })
    );
    expect(reviewSummary(released.byId[a])).toEqual({
      status: 'released',
      text: 'released after review by Riverside Hospital',
      comment: 'fine',
      decidedAt: decided_at
    });
    const rejected = listed(
      record(a, {
        state: 'rejected',
        review: review({ status: 'rejected', comment: 'cells under 10 people', decided_at })
      })
    );
    expect(reviewSummary(rejected.byId[a])).toEqual({
      status: 'rejected',
      text: 'rejected in review by Riverside Hospital',
      comment: 'cells under 10 people',
      decidedAt: decided_at
    });
    // Known from an event only: the outcome without names.
    const b = newId();
    const bare = reduce(EMPTY, { type: 'event', event: event(b, 'rejected') });
    expect(reviewSummary(bare.byId[b])).toEqual({
      status: null,
      text: 'rejected in review',
      comment: null,
      decidedAt: null
    });
  });

  it('no review line for the states that are not about review', () => {
    for (const state of JOB_STATES.filter(s => !['held', 'released', 'rejected', 'failed'].includes(s))) {
      const a = newId();
      expect(reviewSummary(listed(record(a, { state, review: review() })).byId[a])).toBeNull();
    }
    const a = newId();
    expect(reviewSummary(listed(record(a, { state: 'failed' })).byId[a])).toBeNull();
  });

  it('a failed run whose traceback waits for the reviewers says so, and shows it once released', () => {
    const a = newId();
    const failure = { reason: 'cell 3 failed', cell: 2, ename: 'ValueError' };
    const view = (r: Partial<IJobReview>, f: object = failure) =>
      listed(record(a, { state: 'failed', failure: f as never, review: review(r) })).byId[a];
    expect(reviewSummary(view({ status: 'waiting', approvals: 0, required_approvals: 1 }))?.text).toBe(
      'traceback held for review by Riverside Hospital — 0 of 1 approval'
    );
    expect(reviewSummary(view({ status: 'unsent', note: 'no airlock' }))?.text).toBe(
      'traceback not yet sent for review — no airlock'
    );
    const withheld = reviewSummary(view({ status: 'rejected', comment: 'it names a patient' }));
    expect(withheld).toMatchObject({
      text: 'traceback withheld by Riverside Hospital',
      comment: 'it names a patient'
    });
    expect(failureDetailOf(view({ status: 'waiting' }))).toBeNull();
    const detail = { evalue: 'bad value', traceback: 'Traceback ...\nValueError: bad value' };
    const released = view({ status: 'released' }, { ...failure, detail });
    expect(reviewSummary(released)?.text).toBe('traceback released by Riverside Hospital');
    expect(failureDetailOf(released)).toEqual(detail);
    expect(failureOf(released)).toBe('cell 3 failed in code cell 3 (ValueError)');
    expect(
      failureDetailOf(listed(record(a, { state: 'held', failure: { ...failure, detail } })).byId[a])
    ).toBeNull();
  });

  it('released outputs open like succeeded ones; nothing else has outputs to open', () => {
    expect(JOB_STATES.filter(hasOutputs)).toEqual(['succeeded', 'released']);
    const a = newId();
    const done = record(a, { state: 'released', outputs_path: `dcr-jobs/${a}`, receipt: true });
    expect(executedNotebookPath(done)).toBe(`dcr-jobs/${a}/analysis.enclave-${a.slice(4, 12)}.ipynb`);
  });

  it('a rejected job shows its failure when its record carries one, never its event reason', () => {
    const a = newId();
    const failure = { reason: 'outputs failed the disclosure checks', cell: null, ename: null };
    expect(failureOf(listed(record(a, { state: 'rejected', failure })).byId[a])).toBe(
      'outputs failed the disclosure checks'
    );
    const s = reduce(EMPTY, { type: 'event', event: { ...event(a, 'rejected'), reason: 'rejected' } });
    expect(failureOf(s.byId[a])).toBeNull();
    const f = reduce(EMPTY, { type: 'event', event: { ...event(a, 'failed'), reason: 'boom' } });
    expect(failureOf(f.byId[a])).toBe('boom');
    expect(failureOf(listed(record(a, { state: 'held', failure })).byId[a])).toBeNull();
  });
});

describe('review notifications', () => {
  const released = (id: string, comment: string | null = null): IJob =>
    record(id, {
      state: 'released',
      outputs_path: `dcr-jobs/${id}`,
      receipt: true,
      review: review({ status: 'released', approvals: 2, comment })
    });
  const rejected = (id: string): IJob =>
    record(id, { state: 'rejected', review: review({ status: 'rejected', comment: 'too detailed' }) });

  it('are due once when a job known as held is released or rejected, by a listing or a record', () => {
    const a = newId();
    const b = newId();
    const held = run([
      {
        type: 'loaded',
        jobs: [
          record(a, { state: 'held', review: review() }),
          record(b, { state: 'held', review: review() })
        ],
        total: 2
      }
    ]);
    const listing: JobsAction = { type: 'loaded', jobs: [released(a), rejected(b)], total: 2 };
    const after = reduce(held, listing);
    expect(decidedBy(held, listing, after).map(v => [v.id, v.state])).toEqual([
      [a, 'released'],
      [b, 'rejected']
    ]);
    expect(notificationsDue(held, listing, after).map(v => v.id)).toEqual([a, b]);
    // The same news again (another listing, the record, the event) is not a second transition.
    for (const again of [
      listing,
      { type: 'job', job: released(a) } as JobsAction,
      { type: 'event', event: event(a, 'released') } as JobsAction
    ]) {
      expect(notificationsDue(after, again, reduce(after, again))).toEqual([]);
    }
    const one: JobsAction = { type: 'job', job: released(a) };
    expect(decidedBy(held, one, reduce(held, one)).map(v => v.id)).toEqual([a]);
  });

  it('are due once when the event comes first, and not again when its record follows', () => {
    const a = newId();
    const held = listed(record(a, { state: 'held', review: review() }));
    const ev: JobsAction = { type: 'event', event: event(a, 'released') };
    const after = reduce(held, ev);
    const due = notificationsDue(held, ev, after);
    expect(due.map(v => v.id)).toEqual([a]);
    expect(due[0].stale).toBe(true); // the panel fetches the record (outputs, comment) before notifying
    const rec: JobsAction = { type: 'job', job: released(a) };
    expect(notificationsDue(after, rec, reduce(after, rec))).toEqual([]);
  });

  it('are not due for a job first seen already decided, nor for one decided without being held here', () => {
    const a = newId();
    const first: JobsAction = { type: 'loaded', jobs: [released(a), rejected(newId())], total: 2 };
    expect(notificationsDue(EMPTY, first, reduce(EMPTY, first))).toEqual([]);
    const running = listed(record(a, { state: 'running' }));
    const rec: JobsAction = { type: 'job', job: released(a) };
    expect(decidedBy(running, rec, reduce(running, rec))).toEqual([]);
    expect(decidedBy(running, { type: 'error', message: 'x' }, running)).toEqual([]);
    // Held → held with one more approval is no decision.
    const held = listed(record(a, { state: 'held', review: review({ approvals: 0 }) }));
    const more: JobsAction = {
      type: 'job',
      job: record(a, { state: 'held', updated: '2026-11-25T10:05:00.000Z', review: review() })
    };
    const next = reduce(held, more);
    expect(reviewSummary(next.byId[a])?.text).toContain('1 of 2 approvals');
    expect(notificationsDue(held, more, next)).toEqual([]);
  });

  it('say what happened: held with reviewers, released, rejected with the comment, failures', () => {
    const a = newId();
    expect(noticeOf(listed(record(a, { state: 'held', review: review() })).byId[a])).toEqual({
      message: 'Enclave job analysis.ipynb: held for review by Riverside Hospital — 1 of 2 approvals',
      type: 'info'
    });
    expect(noticeOf(listed(released(a)).byId[a])).toEqual({
      message: 'Enclave job analysis.ipynb: released after review by Riverside Hospital',
      type: 'success'
    });
    expect(noticeOf(listed(released(a, 'ok to publish')).byId[a]).message).toBe(
      'Enclave job analysis.ipynb: released after review by Riverside Hospital: “ok to publish”'
    );
    expect(noticeOf(listed(rejected(a)).byId[a])).toEqual({
      message: 'Enclave job analysis.ipynb: rejected in review by Riverside Hospital: “too detailed”',
      type: 'error'
    });
    const failure = { reason: 'error', cell: 1, ename: 'ZeroDivisionError' };
    expect(noticeOf(listed(record(a, { state: 'failed', failure })).byId[a])).toEqual({
      message: 'Enclave job analysis.ipynb: failed: error in code cell 2 (ZeroDivisionError)',
      type: 'error'
    });
    expect(noticeOf(listed(record(a, { state: 'succeeded' })).byId[a])).toEqual({
      message: 'Enclave job analysis.ipynb: succeeded',
      type: 'success'
    });
    expect(noticeOf(listed(record(a, { state: 'cancelled' })).byId[a]).type).toBe('warning');
    const b = newId();
    expect(noticeOf(reduce(EMPTY, { type: 'event', event: event(b, 'rejected') }).byId[b])).toEqual({
      message: `Enclave job ${b}: rejected in review`,
      type: 'error'
    });
  });
});
