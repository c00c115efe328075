/**
 * The live jobs model: the pure reducer of `model.ts` fed by the REST API and by the server's event bus.
 *
 * Progress is pushed: job events arrive on JupyterLab's event stream (`serviceManager.events.stream`,
 * the server's `/api/events/subscribe` websocket) and are applied at once. The REST API is asked only
 * for the first listing, when the panel is shown again (events may have been missed while the socket was
 * down), for older pages when the user asks for them, and for a single job whose events got ahead of its
 * record (an unknown job, or one that ended: its outputs and receipt are in the record). There is no timer
 * polling.
 */

import { Event } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { DCRClient, errorMessage } from './api';
import {
  EMPTY,
  IJobView,
  IJobsState,
  JobsAction,
  listedOf,
  notificationsDue,
  parseJobEvent,
  reduce
} from './model';
import { IJob } from './types';

/** The `$id` of the job event schema (dcr_server_ext/events/job.json). */
export const JOB_EVENT_SCHEMA_ID = 'https://jupyterhub-dcr.invalid/events/job/v1';

/** Jobs per listing request, newest first (the server answers at most 500 per request). */
export const PAGE_SIZE = 200;
/** How many known jobs a further page asks for again (see `loadMore`). */
const PAGE_OVERLAP = 5;

export class JobsModel implements IDisposable {
  constructor(
    readonly client: DCRClient,
    private readonly _events: Event.IManager | null
  ) {
    this._events?.stream.connect(this._onEmission, this);
  }

  get state(): IJobsState {
    return this._state;
  }

  /** The state changed (the argument is the new state). */
  get changed(): ISignal<this, IJobsState> {
    return this._changed;
  }

  /**
   * A job ended or went to review (by an event), or the reviewers decided a job known as held (by any
   * news of it: an event, a listing, a record); emitted once per change, after the record was fetched if
   * the events got ahead of it.
   */
  get ended(): ISignal<this, IJobView> {
    return this._ended;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._events?.stream.disconnect(this._onEmission, this);
    Signal.clearData(this);
  }

  /** Apply one action; returns the views it makes a notification due for (`notificationsDue`). */
  dispatch(action: JobsAction): IJobView[] {
    const before = this._state;
    const after = reduce(before, action);
    if (after !== before) {
      this._state = after;
      this._changed.emit(after);
    }
    return notificationsDue(before, action, after);
  }

  /**
   * Reload the newest page of jobs (merged: nothing moves backwards). Older jobs brought by `loadMore`
   * stay listed; they have ended long ago, or their events keep them current.
   */
  async refresh(): Promise<void> {
    await this._list(0);
  }

  /** Jobs the server has that are not listed here yet (as of the last listing). */
  get remaining(): number {
    const listed = listedOf(this._state);
    return listed === null ? 0 : listed.total - listed.shown;
  }

  /**
   * Fetch the next page of older jobs; resolves to how many jobs it added (0 on an error, which the
   * state shows). Concurrent calls share one request.
   */
  loadMore(): Promise<number> {
    if (this._loadingMore === null) {
      // The listing is newest first and the jobs known here are the newest ones (those that arrived by
      // events are newer than any listed), so the next page starts after as many. It overlaps them a
      // little (duplicates merge): a submission the hub refused is deleted, so one known job may be gone.
      const offset = Math.max(0, Object.keys(this._state.byId).length - PAGE_OVERLAP);
      this._loadingMore = this._list(offset).finally(() => {
        this._loadingMore = null;
      });
    }
    return this._loadingMore;
  }

  /** Fetch pages until every job is listed; stops at an error or a page that adds nothing. */
  async loadAll(): Promise<void> {
    if (!this._state.loaded) {
      await this.loadMore();
    }
    while (this.remaining > 0 && (await this.loadMore()) > 0) {
      // next page
    }
  }

  /** One page from `offset`; returns how many jobs it added. */
  private async _list(offset: number): Promise<number> {
    const before = Object.keys(this._state.byId).length;
    try {
      const list = await this.client.listJobs(offset, PAGE_SIZE);
      // A listing brings the reviewers' decisions on held jobs whose events were missed.
      this._emitEnded(this.dispatch({ type: 'loaded', jobs: list.jobs, total: list.total }));
    } catch (error) {
      this.dispatch({ type: 'error', message: errorMessage(error) });
    }
    return Object.keys(this._state.byId).length - before;
  }

  /** A record from elsewhere (a submission, a cancel). */
  upsert(job: IJob): void {
    this._emitEnded(this.dispatch({ type: 'job', job }));
  }

  private _emitEnded(views: IJobView[]): void {
    for (const view of views) {
      this._ended.emit(view);
    }
  }

  /** Cancel a job; the answer (the cancelled job) is applied. Errors are thrown with the server's message. */
  async cancel(id: string): Promise<void> {
    // The server emits "cancelled" before it answers: the user asked for it, so no notification.
    this._cancelledHere.add(id);
    try {
      this.upsert(await this.client.cancel(id));
    } catch (error) {
      this._cancelledHere.delete(id);
      throw error;
    }
  }

  private _onEmission(_: unknown, emission: Event.Emission): void {
    if (emission.schema_id !== JOB_EVENT_SCHEMA_ID) {
      return;
    }
    const event = parseJobEvent(emission);
    if (event === null) {
      return;
    }
    const ended = this.dispatch({ type: 'event', event }).filter(
      v => !(v.state === 'cancelled' && this._cancelledHere.has(v.id))
    );
    const view = this._state.byId[event.job_id];
    if (view?.stale) {
      void this._refreshJob(event.job_id).then(() => {
        for (const e of ended) {
          this._ended.emit(this._state.byId[e.id] ?? e);
        }
      });
      return;
    }
    for (const e of ended) {
      this._ended.emit(e);
    }
    // A held job's events (and a failed one's under review) also announce its review moving on (sent,
    // approvals, a decision), which only the record carries.
    if (event.state === 'held' || (event.state === 'failed' && !!view?.job?.review)) {
      void this._refetch(event.job_id);
    }
  }

  /** Fetch a job's record after any request in flight (answered, maybe, before the change was stored). */
  private async _refetch(id: string): Promise<void> {
    const pending = this._inFlight.get(id);
    if (pending) {
      await pending;
    }
    await this._fetch(id);
  }

  /** Bring a stale job's record up to date with the events seen so far. */
  private async _refreshJob(id: string): Promise<void> {
    // A request in flight may have been answered before this event's change was stored (the server
    // stores, then emits): wait for it, and ask again if the record is still behind.
    const pending = this._inFlight.get(id);
    if (pending) {
      await pending;
    }
    if (this._state.byId[id]?.stale) {
      await this._fetch(id);
    }
  }

  /** Fetch one job's record; concurrent requests for one job are merged into one. */
  private _fetch(id: string): Promise<void> {
    const pending = this._inFlight.get(id);
    if (pending) {
      return pending;
    }
    const request = this.client
      .getJob(id)
      .then(job => {
        this.upsert(job);
      })
      .catch(error => {
        // The panel still shows the state from the events; the next listing brings the record.
        console.warn(`DCR: could not fetch ${id}: ${errorMessage(error)}`);
      })
      .finally(() => {
        this._inFlight.delete(id);
      });
    this._inFlight.set(id, request);
    return request;
  }

  private _state: IJobsState = EMPTY;
  private _disposed = false;
  private _inFlight = new Map<string, Promise<void>>();
  private _loadingMore: Promise<number> | null = null;
  private _cancelledHere = new Set<string>();
  private _changed = new Signal<this, IJobsState>(this);
  private _ended = new Signal<this, IJobView>(this);
}
