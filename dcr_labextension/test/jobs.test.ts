/**
 * The live jobs model (src/jobs.ts) against a fake event stream (a Lumino signal, as JupyterLab's event
 * manager has) and a stub REST client whose answers the tests release one by one: the schema filter,
 * fetching a record its events got ahead of, merging requests, the user's own cancel, when `ended` is
 * emitted, and paging through a long job list.
 */

import { Event } from '@jupyterlab/services';
import { Signal } from '@lumino/signaling';

import { DCRClient, DCRRequestError } from '../src/api';
import { JOB_EVENT_SCHEMA_ID, JobsModel, PAGE_SIZE } from '../src/jobs';
import { IJobView, listedOf } from '../src/model';
import { IJob, IJobList, JobState } from '../src/types';

interface IDeferred<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(reason: unknown): void;
}

function deferred<T>(): IDeferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (reason: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Let every pending promise callback run. */
function flush(): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, 0));
}

let counter = 0;

function newId(): string {
  counter += 1;
  return 'job-' + counter.toString(16).padStart(24, '0');
}

function record(id: string, state: JobState, overrides: Partial<IJob> = {}): IJob {
  const ended = state === 'succeeded';
  return {
    id,
    notebook: 'work/analysis.ipynb',
    state,
    created: '2026-11-25T10:00:00.000Z',
    updated: '2026-11-25T10:00:05.000Z',
    bundle: { digest: 'sha256:' + 'a'.repeat(64), files: 2, bytes: 1234 },
    datasets: [{ provider: 'acme', dataset: 'insurance', version: null, release: null }],
    progress: null,
    failure: null,
    review: null,
    outputs_path: ended ? `dcr-jobs/${id}` : null,
    receipt: ended,
    enclave: null,
    backend: 'LocalBackend',
    ...overrides
  };
}

/**
 * The server side: its jobs (newest first) answer listings at once (or when released, with `holdLists`);
 * single-job and cancel requests wait until the test answers them.
 */
class FakeServer {
  jobs: IJob[] = [];
  lists: { offset: number; limit: number }[] = [];
  gets: { id: string; answer: IDeferred<IJob> }[] = [];
  cancels: { id: string; answer: IDeferred<IJob> }[] = [];
  holdLists = false;
  /** Listings from this offset on fail with this message. */
  failFrom: { offset: number; message: string } | null = null;
  private _held: (() => void)[] = [];

  readonly client = {
    listJobs: async (offset: number, limit: number): Promise<IJobList> => {
      this.lists.push({ offset, limit });
      if (this.holdLists) {
        await new Promise<void>(resolve => this._held.push(resolve));
      }
      if (this.failFrom && offset >= this.failFrom.offset) {
        throw new DCRRequestError(this.failFrom.message, 500);
      }
      return { jobs: this.jobs.slice(offset, offset + limit), total: this.jobs.length, offset, limit };
    },
    getJob: (id: string): Promise<IJob> => {
      const answer = deferred<IJob>();
      this.gets.push({ id, answer });
      return answer.promise;
    },
    cancel: (id: string): Promise<IJob> => {
      const answer = deferred<IJob>();
      this.cancels.push({ id, answer });
      return answer.promise;
    }
  } as unknown as DCRClient;

  releaseLists(): void {
    this.holdLists = false;
    for (const release of this._held.splice(0)) {
      release();
    }
  }

  /** `count` jobs, newest first, all ended. */
  addJobs(count: number): void {
    for (let i = 0; i < count; i++) {
      this.jobs.push(record(newId(), 'succeeded'));
    }
  }
}

class Harness {
  readonly server = new FakeServer();
  readonly stream = new Signal<unknown, Event.Emission>(this);
  readonly model = new JobsModel(this.server.client, { stream: this.stream } as unknown as Event.IManager);
  readonly ended: IJobView[] = [];
  changes = 0;

  constructor() {
    this.model.ended.connect((_, view) => this.ended.push(view));
    this.model.changed.connect(() => {
      this.changes += 1;
    });
  }

  event(jobId: string, state: JobState, cell: number | null = null, cells: number | null = null): void {
    this.stream.emit({ schema_id: JOB_EVENT_SCHEMA_ID, job_id: jobId, state, cell, cells, reason: null });
  }

  view(id: string): IJobView {
    return this.model.state.byId[id];
  }

  /** Load the given records as the first listing. */
  async listed(...jobs: IJob[]): Promise<void> {
    this.server.jobs = jobs;
    await this.model.refresh();
  }
}

describe('job events', () => {
  it('ignores emissions of other schemas and malformed job events', async () => {
    const h = new Harness();
    const id = newId();
    h.stream.emit({
      schema_id: 'https://events.jupyter.org/jupyter_server/kernel_actions/v1',
      job_id: id,
      state: 'running'
    });
    h.stream.emit({ schema_id: JOB_EVENT_SCHEMA_ID, job_id: 'job-not-an-id', state: 'running' });
    h.stream.emit({ schema_id: JOB_EVENT_SCHEMA_ID, job_id: id, state: 'exploded' });
    await flush();
    expect(h.model.state.byId).toEqual({});
    expect(h.changes).toBe(0);
    expect(h.server.gets).toEqual([]);
  });

  it('an event for an unknown job shows it at once and fetches its record', async () => {
    const h = new Harness();
    await h.listed();
    const id = newId();
    h.event(id, 'running', 1, 4);
    expect(h.view(id)).toMatchObject({ state: 'running', cell: 1, cells: 4, job: null, stale: true });
    expect(h.server.gets.map(g => g.id)).toEqual([id]);

    h.server.gets[0].answer.resolve(record(id, 'running', { progress: { cell: 1, cells: 4 } }));
    await flush();
    expect(h.view(id).job?.notebook).toBe('work/analysis.ipynb');
    expect(h.view(id).stale).toBe(false);
    expect(h.server.gets).toHaveLength(1);
  });

  it('progress events of a listed job need no request', async () => {
    const h = new Harness();
    const id = newId();
    await h.listed(record(id, 'running', { progress: { cell: 0, cells: 3 } }));
    h.event(id, 'running', 1, 3);
    h.event(id, 'running', 2, 3);
    h.event(id, 'checking');
    await flush();
    expect(h.view(id)).toMatchObject({ state: 'checking', cell: 2, cells: 3, stale: false });
    expect(h.server.gets).toEqual([]);
    expect(h.ended).toEqual([]);
  });

  it('a job that ends is announced once, after its record (outputs, receipt) was fetched', async () => {
    const h = new Harness();
    const id = newId();
    await h.listed(record(id, 'running'));
    h.event(id, 'succeeded');
    expect(h.view(id).stale).toBe(true);
    await flush();
    expect(h.ended).toEqual([]); // not before the record is there
    expect(h.server.gets.map(g => g.id)).toEqual([id]);

    h.server.gets[0].answer.resolve(record(id, 'succeeded'));
    await flush();
    expect(h.ended).toHaveLength(1);
    expect(h.ended[0]).toMatchObject({ id, state: 'succeeded', stale: false });
    expect(h.ended[0].job).toMatchObject({
      state: 'succeeded',
      receipt: true,
      outputs_path: `dcr-jobs/${id}`
    });

    h.event(id, 'succeeded'); // a duplicate: nothing new
    await flush();
    expect(h.ended).toHaveLength(1);
    expect(h.server.gets).toHaveLength(1);
  });

  it('a failed fetch still announces the end, with the state the events gave', async () => {
    const h = new Harness();
    const id = newId();
    await h.listed(record(id, 'running'));
    const warn = jest.spyOn(console, 'warn').mockImplementation(() => undefined);
    try {
      h.event(id, 'failed');
      h.server.gets[0].answer.reject(new DCRRequestError('the server cannot be reached: offline', 0));
      await flush();
      expect(warn).toHaveBeenCalledWith(expect.stringContaining(`could not fetch ${id}`));
    } finally {
      warn.mockRestore();
    }
    expect(h.ended.map(v => [v.id, v.state])).toEqual([[id, 'failed']]);
    expect(h.view(id).job?.state).toBe('running');
  });

  it('events while a fetch is in flight share it when its answer has caught up', async () => {
    const h = new Harness();
    await h.listed();
    const id = newId();
    h.event(id, 'launching');
    h.event(id, 'running', 0, 2);
    h.event(id, 'running', 1, 2);
    await flush();
    expect(h.server.gets).toHaveLength(1);

    h.server.gets[0].answer.resolve(record(id, 'running', { progress: { cell: 1, cells: 2 } }));
    await flush();
    expect(h.server.gets).toHaveLength(1);
    expect(h.view(id)).toMatchObject({ state: 'running', cell: 1, stale: false });
  });

  it('asks once more when the answer in flight was stored before the job ended; waiters share that request', async () => {
    const h = new Harness();
    await h.listed();
    const id = newId();
    h.event(id, 'running', 0, 2);
    h.event(id, 'succeeded');
    h.event(id, 'succeeded'); // delivered twice: both wait, then share the second request
    await flush();
    expect(h.server.gets).toHaveLength(1); // the others wait for the first

    h.server.gets[0].answer.resolve(record(id, 'running'));
    await flush();
    expect(h.server.gets.map(g => g.id)).toEqual([id, id]);
    expect(h.ended).toEqual([]);

    h.server.gets[1].answer.resolve(record(id, 'succeeded'));
    await flush();
    expect(h.ended).toHaveLength(1);
    expect(h.ended[0].job?.receipt).toBe(true);
  });

  it("the user's own cancel is not announced; a cancel from elsewhere is", async () => {
    const h = new Harness();
    const mine = newId();
    const other = newId();
    await h.listed(record(mine, 'running'), record(other, 'running'));

    const cancelling = h.model.cancel(mine);
    expect(h.server.cancels.map(c => c.id)).toEqual([mine]);
    h.event(mine, 'cancelled'); // the server emits before it answers
    h.server.cancels[0].answer.resolve(record(mine, 'cancelled'));
    await cancelling;
    for (const get of h.server.gets) {
      get.answer.resolve(record(get.id, 'cancelled'));
    }
    await flush();
    expect(h.view(mine).state).toBe('cancelled');
    expect(h.ended).toEqual([]);

    h.event(other, 'cancelled'); // e.g. `dcr cancel` in a terminal
    for (const get of h.server.gets.filter(g => g.id === other)) {
      get.answer.resolve(record(other, 'cancelled'));
    }
    await flush();
    expect(h.ended.map(v => [v.id, v.state])).toEqual([[other, 'cancelled']]);
  });

  it('a refused cancel is thrown with the server’s message, and a later cancel is announced', async () => {
    const h = new Harness();
    const id = newId();
    await h.listed(record(id, 'running'));
    const cancelling = h.model.cancel(id);
    h.server.cancels[0].answer.reject(new DCRRequestError('job-… is being cancelled already', 409));
    await expect(cancelling).rejects.toThrow('job-… is being cancelled already');

    h.event(id, 'cancelled');
    h.server.gets[0].answer.resolve(record(id, 'cancelled'));
    await flush();
    expect(h.ended.map(v => [v.id, v.state])).toEqual([[id, 'cancelled']]);
  });

  it('a disposed model no longer listens', async () => {
    const h = new Harness();
    await h.listed();
    h.model.dispose();
    h.event(newId(), 'running');
    await flush();
    expect(h.model.state.byId).toEqual({});
    expect(h.server.gets).toEqual([]);
  });
});

describe('review decisions', () => {
  const waiting = {
    status: 'waiting' as const,
    reviewers: ['Riverside Hospital'],
    required_approvals: 1,
    approvals: 0,
    comment: null,
    decided_at: null,
    note: null
  };
  const released = (id: string): IJob =>
    record(id, 'released', {
      outputs_path: `dcr-jobs/${id}`,
      receipt: true,
      review: { ...waiting, status: 'released', approvals: 1, decided_at: '2026-12-06T21:00:00.000Z' }
    });

  it('a held job released by the reviewers is announced once, with its outputs, after the event', async () => {
    const h = new Harness();
    const id = newId();
    await h.listed(record(id, 'held', { review: waiting }));
    expect(h.ended).toEqual([]); // already held on the first listing: no news
    h.event(id, 'released');
    await flush();
    expect(h.ended).toEqual([]); // not before the record (outputs, comment) is there
    h.server.gets[0].answer.resolve(released(id));
    await flush();
    expect(h.ended.map(v => [v.id, v.state, v.job?.outputs_path])).toEqual([
      [id, 'released', `dcr-jobs/${id}`]
    ]);
    h.event(id, 'released');
    h.server.jobs = [released(id)];
    await h.model.refresh();
    expect(h.ended).toHaveLength(1);
  });

  it('an event of a held job fetches its record: the review moved on (sent, an approval)', async () => {
    const h = new Harness();
    const id = newId();
    const unsent = { ...waiting, status: 'unsent' as const, approvals: 0, reviewers: [] };
    await h.listed(record(id, 'held', { review: unsent }));
    h.event(id, 'held');
    await flush();
    expect(h.server.gets.map(g => g.id)).toEqual([id]);
    h.server.gets[0].answer.resolve(record(id, 'held', { review: waiting }));
    await flush();
    expect(h.view(id).job?.review?.status).toBe('waiting');
    expect(h.ended).toEqual([]); // the review moving on is not an end
    h.event(id, 'running'); // a progress event of another state needs no request
    await flush();
    expect(h.server.gets).toHaveLength(1);
  });

  it('a decision whose event was missed is announced once when a listing brings it', async () => {
    const h = new Harness();
    const id = newId();
    const other = newId();
    await h.listed(record(id, 'held', { review: waiting }), record(other, 'held', { review: waiting }));
    const rejected = record(other, 'rejected', {
      review: { ...waiting, status: 'rejected', comment: 'too detailed' }
    });
    h.server.jobs = [released(id), rejected];
    await h.model.refresh();
    expect(h.ended.map(v => [v.id, v.state])).toEqual([
      [id, 'released'],
      [other, 'rejected']
    ]);
    expect(h.ended[1].job?.review?.comment).toBe('too detailed');
    await h.model.refresh();
    h.event(other, 'rejected');
    await flush();
    expect(h.ended).toHaveLength(2);
    expect(h.server.gets).toEqual([]);
  });

  it('jobs decided before the panel knew them are not announced', async () => {
    const h = new Harness();
    await h.listed(released(newId()), record(newId(), 'rejected'));
    await h.model.refresh();
    expect(h.ended).toEqual([]);
  });
});

describe('paging through every job', () => {
  it('the first listing is the newest page; older pages come on demand until every job is listed', async () => {
    const h = new Harness();
    h.server.addJobs(450);
    await h.model.refresh();
    expect(h.server.lists).toEqual([{ offset: 0, limit: PAGE_SIZE }]);
    expect(listedOf(h.model.state)).toEqual({ shown: 200, total: 450 });
    expect(h.model.remaining).toBe(250);

    expect(await h.model.loadMore()).toBe(195);
    expect(listedOf(h.model.state)).toEqual({ shown: 395, total: 450 });
    expect(await h.model.loadMore()).toBe(55);
    expect(listedOf(h.model.state)).toBeNull();
    expect(h.model.remaining).toBe(0);
    expect(Object.keys(h.model.state.byId).sort()).toEqual(h.server.jobs.map(j => j.id).sort());
    // Each further page overlaps the known jobs a little, and never skips one.
    expect(h.server.lists.slice(1).map(l => l.offset)).toEqual([195, 390]);
  });

  it('a reload after paging keeps the older jobs listed', async () => {
    const h = new Harness();
    h.server.addJobs(300);
    await h.model.loadAll();
    await h.model.refresh();
    expect(Object.keys(h.model.state.byId)).toHaveLength(300);
    expect(listedOf(h.model.state)).toBeNull();
  });

  it('concurrent requests for the next page share one request', async () => {
    const h = new Harness();
    h.server.addJobs(250);
    await h.model.refresh();
    h.server.holdLists = true;
    const first = h.model.loadMore();
    const second = h.model.loadMore();
    expect(h.server.lists).toHaveLength(2);
    h.server.releaseLists();
    expect(await first).toBe(50);
    expect(await second).toBe(50);
    expect(h.server.lists).toHaveLength(2);
  });

  it('jobs submitted elsewhere meanwhile shift the pages without a job being skipped', async () => {
    const h = new Harness();
    h.server.addJobs(410);
    await h.model.refresh();
    const fresh = [newId(), newId(), newId()];
    for (const id of fresh) {
      h.server.jobs.unshift(record(id, 'submitted'));
      h.event(id, 'submitted');
    }
    await h.model.loadAll();
    expect(Object.keys(h.model.state.byId).sort()).toEqual(h.server.jobs.map(j => j.id).sort());
    expect(listedOf(h.model.state)).toBeNull();
  });

  it('"load all" from nothing lists every page, and stops at an error showing the server’s message', async () => {
    const h = new Harness();
    h.server.addJobs(450);
    await h.model.loadAll();
    expect(h.server.lists.map(l => l.offset)).toEqual([0, 195, 390]);
    expect(Object.keys(h.model.state.byId)).toHaveLength(450);

    const broken = new Harness();
    broken.server.addJobs(700);
    broken.server.failFrom = { offset: 1, message: 'the job store is not reachable' };
    await broken.model.loadAll();
    expect(broken.server.lists.map(l => l.offset)).toEqual([0, 195]);
    expect(broken.model.state.error).toBe('the job store is not reachable');
    expect(listedOf(broken.model.state)).toEqual({ shown: 200, total: 700 });
  });

  it('a complete list needs no paging', async () => {
    const h = new Harness();
    expect(listedOf(h.model.state)).toBeNull(); // nothing listed yet
    h.server.addJobs(PAGE_SIZE);
    await h.model.refresh();
    expect(listedOf(h.model.state)).toBeNull();
    expect(h.model.remaining).toBe(0);
  });
});
