/**
 * The jobs panel's state, as a pure reducer: job records from the REST API and job events from the
 * server's event bus go in, one consistent view per job comes out.
 *
 * Records and events race: a listing fetched before an event can arrive after it, and an event names
 * only the state and cell i of n. So a job's view never moves backwards: states only advance in
 * lifecycle order, terminal states are final, and within one state the cell only grows. A view whose
 * record lags behind its events (an unknown job, or one that just ended) is marked `stale`, so the panel
 * fetches the record once (the server stores every change before it emits it).
 *
 * Nothing here touches the DOM, the network or JupyterLab: jest tests it under Node.
 */

import { failureText, stateLabel } from './format';
import { IJob, IJobEvent, IJobReview, JobState, ReviewStatus } from './types';

/** Every lifecycle state, in lifecycle order. */
export const JOB_STATES: readonly JobState[] = [
  'submitted',
  'granted',
  'launching',
  'running',
  'checking',
  'succeeded',
  'held',
  'released',
  'rejected',
  'failed',
  'cancelled'
];

/** States after which nothing changes any more. */
export const TERMINAL_STATES: ReadonlySet<JobState> = new Set<JobState>([
  'succeeded',
  'released',
  'rejected',
  'failed',
  'cancelled'
]);

/** How far along the lifecycle a state is; a job never goes to a lower rank. */
const RANK: Readonly<Record<JobState, number>> = {
  submitted: 0,
  granted: 1,
  launching: 2,
  running: 3,
  checking: 4,
  held: 5,
  succeeded: 6,
  released: 6,
  rejected: 6,
  failed: 6,
  cancelled: 6
};

export const JOB_ID_RE = /^job-[0-9a-f]{24}$/;

/** What the panel shows for one job. */
export interface IJobView {
  readonly id: string;
  /** The latest record from the REST API; null for a job known only from its events so far. */
  readonly job: IJob | null;
  readonly state: JobState;
  /** Cell i (0-based) the enclave started last, of `cells`; null before the enclave knows. */
  readonly cell: number | null;
  readonly cells: number | null;
  /** A failed job's reason, from its event or record. */
  readonly reason: string | null;
  /** The record lags behind the events in a way the panel cares about: fetch it. */
  readonly stale: boolean;
}

export interface IJobsState {
  readonly byId: Readonly<Record<string, IJobView>>;
  /** The first listing has arrived. */
  readonly loaded: boolean;
  /** The last listing's error, as the server wrote it; null once a listing succeeds. */
  readonly error: string | null;
  /** Jobs the server has in all (the listing is one page). */
  readonly total: number;
}

export type JobsAction =
  /** A page of `GET /dcr/api/jobs`; jobs not on it are kept (they may be on another page). */
  | { type: 'loaded'; jobs: IJob[]; total: number }
  /** One record: an answer to GET, POST (submit) or cancel. */
  | { type: 'job'; job: IJob }
  /** One job event from the event bus. */
  | { type: 'event'; event: IJobEvent }
  /** The listing failed. */
  | { type: 'error'; message: string };

export const EMPTY: IJobsState = { byId: {}, loaded: false, error: null, total: 0 };

export function isTerminal(state: JobState): boolean {
  return TERMINAL_STATES.has(state);
}

/** Ended, or waiting for review: the states a notification is sent for. */
export function hasEnded(state: JobState): boolean {
  return isTerminal(state) || state === 'held';
}

function isState(value: unknown): value is JobState {
  return typeof value === 'string' && Object.prototype.hasOwnProperty.call(RANK, value);
}

function isCount(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value) && value >= 0;
}

/** A job event checked field by field; null for anything that is not one (other schemas, bad data). */
export function parseJobEvent(data: unknown): IJobEvent | null {
  if (typeof data !== 'object' || data === null) {
    return null;
  }
  const d = data as { [key: string]: unknown };
  if (typeof d.job_id !== 'string' || !JOB_ID_RE.test(d.job_id) || !isState(d.state)) {
    return null;
  }
  const cell = d.cell === null || d.cell === undefined ? null : d.cell;
  const cells = d.cells === null || d.cells === undefined ? null : d.cells;
  if ((cell !== null && !isCount(cell)) || (cells !== null && !isCount(cells))) {
    return null;
  }
  const reason = typeof d.reason === 'string' ? d.reason : null;
  return { job_id: d.job_id, state: d.state, cell, cells, reason };
}

interface IUpdate {
  state: JobState;
  cell: number | null;
  cells: number | null;
  reason: string | null;
}

/**
 * Whether `next` may replace `current`'s state: it is further along the lifecycle, or the same state.
 * A terminal state is final (a second, different terminal state is a late duplicate and is ignored).
 */
function accepts(current: JobState, next: JobState): boolean {
  if (isTerminal(current)) {
    return next === current;
  }
  return RANK[next] >= RANK[current];
}

/** Merge an update into a view (or create one); returns the same object when nothing changes. */
function merge(view: IJobView | undefined, id: string, update: IUpdate, job: IJob | null): IJobView {
  if (view === undefined) {
    return withStale({ id, job, ...update, stale: false });
  }
  let { state, cell, cells, reason } = view;
  if (accepts(view.state, update.state)) {
    if (update.state !== view.state) {
      state = update.state;
      cell = update.cell ?? cell;
      cells = update.cells ?? cells;
    } else if (update.cells !== null) {
      if (cells !== update.cells) {
        cell = update.cell;
        cells = update.cells;
      } else if (update.cell !== null && (cell === null || update.cell > cell)) {
        // Same state: the cell only grows (a late listing must not pull the bar back).
        cell = update.cell;
      }
    }
    reason = update.reason ?? reason;
  }
  const record = job === null ? view.job : newerRecord(view.job, job);
  if (
    state === view.state &&
    cell === view.cell &&
    cells === view.cells &&
    reason === view.reason &&
    record === view.job
  ) {
    return view;
  }
  return withStale({ id, job: record, state, cell, cells, reason, stale: false });
}

/** Keep the record that is further along (ties: the later `updated`, then the new one). */
function newerRecord(current: IJob | null, next: IJob): IJob {
  if (current === null) {
    return next;
  }
  if (!accepts(current.state, next.state)) {
    return current;
  }
  if (next.state === current.state && Date.parse(next.updated) < Date.parse(current.updated)) {
    return current;
  }
  return next;
}

function withStale(view: IJobView): IJobView {
  // Events say "ended" but the record has no outputs, receipt or failure yet; or no record at all.
  const stale = view.job === null || (view.job.state !== view.state && hasEnded(view.state));
  return stale === view.stale ? view : { ...view, stale };
}

function fromRecord(job: IJob): IUpdate {
  return {
    state: job.state,
    cell: job.progress ? job.progress.cell : null,
    cells: job.progress ? job.progress.cells : null,
    reason: job.failure ? job.failure.reason : null
  };
}

function put(state: IJobsState, view: IJobView): IJobsState {
  if (state.byId[view.id] === view) {
    return state;
  }
  return { ...state, byId: { ...state.byId, [view.id]: view } };
}

/** The reducer. Pure: returns `state` itself when the action changes nothing. */
export function reduce(state: IJobsState, action: JobsAction): IJobsState {
  switch (action.type) {
    case 'loaded': {
      let next: IJobsState = state;
      for (const job of action.jobs) {
        next = put(next, merge(next.byId[job.id], job.id, fromRecord(job), job));
      }
      if (next.loaded && next.error === null && next.total === action.total) {
        return next;
      }
      return { ...next, loaded: true, error: null, total: action.total };
    }
    case 'job':
      return put(state, merge(state.byId[action.job.id], action.job.id, fromRecord(action.job), action.job));
    case 'event': {
      const e = action.event;
      const update: IUpdate = { state: e.state, cell: e.cell, cells: e.cells, reason: e.reason };
      return put(state, merge(state.byId[e.job_id], e.job_id, update, null));
    }
    case 'error':
      return state.error === action.message ? state : { ...state, error: action.message };
  }
}

function createdMs(view: IJobView): number {
  return view.job ? Date.parse(view.job.created) : Number.POSITIVE_INFINITY;
}

/** Newest first; jobs known only from events (just submitted elsewhere) on top; ties by id. */
export function orderedJobs(state: IJobsState): IJobView[] {
  return Object.values(state.byId).sort((a, b) => {
    const d = createdMs(b) - createdMs(a);
    if (d !== 0 && !Number.isNaN(d)) {
      return d;
    }
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  });
}

/** How much of the server's job list is known: null once every job is (or before the first listing). */
export function listedOf(state: IJobsState): { shown: number; total: number } | null {
  const shown = Object.keys(state.byId).length;
  return state.loaded && shown < state.total ? { shown, total: state.total } : null;
}

/** The jobs that ended (or went to review) through this event: what the panel notifies about. */
export function endedBy(before: IJobsState, action: JobsAction, after: IJobsState): IJobView[] {
  if (action.type !== 'event') {
    return [];
  }
  const view = after.byId[action.event.job_id];
  const previous = before.byId[action.event.job_id];
  if (
    view === undefined ||
    !hasEnded(view.state) ||
    (previous !== undefined && previous.state === view.state)
  ) {
    return [];
  }
  return [view];
}

/** States a reviewer decided: a held job goes to one of them. */
const DECIDED: ReadonlySet<JobState> = new Set<JobState>(['released', 'rejected']);

/**
 * The jobs the panel knew as `held` that this action moved to `released` or `rejected`, whatever brought
 * the news (an event, a listing after the socket was down, a record): each such move is due one
 * notification. A job that first arrives already decided (the first listing) is not.
 */
export function decidedBy(before: IJobsState, action: JobsAction, after: IJobsState): IJobView[] {
  const ids =
    action.type === 'loaded'
      ? action.jobs.map(j => j.id)
      : action.type === 'job'
        ? [action.job.id]
        : action.type === 'event'
          ? [action.event.job_id]
          : [];
  const found: IJobView[] = [];
  for (const id of new Set(ids)) {
    const previous = before.byId[id];
    const view = after.byId[id];
    if (previous?.state === 'held' && view !== undefined && DECIDED.has(view.state)) {
      found.push(view);
    }
  }
  return found;
}

/** Every notification this action makes due: jobs ended or held by an event, and review decisions. */
export function notificationsDue(before: IJobsState, action: JobsAction, after: IJobsState): IJobView[] {
  const due = endedBy(before, action, after);
  for (const view of decidedBy(before, action, after)) {
    if (!due.some(v => v.id === view.id)) {
      due.push(view);
    }
  }
  return due;
}

/** The job's review as its record has it; null when there is none (never held, no record yet, an older server). */
export function reviewOf(view: IJobView): IJobReview | null {
  return view.job?.review ?? null;
}

/** "the provider", "Riverside Hospital", "A and B", "A, B and C". */
export function reviewersText(names: readonly string[]): string {
  if (names.length === 0) {
    return 'the provider';
  }
  if (names.length === 1) {
    return names[0];
  }
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]}`;
}

/** "0 of 1 approval", "1 of 2 approvals". */
export function approvalsText(review: Pick<IJobReview, 'approvals' | 'required_approvals'>): string {
  const required = review.required_approvals;
  return `${review.approvals} of ${required} approval${required === 1 ? '' : 's'}`;
}

/** What the panel says about a job's review: one line, and the reviewers' comment apart (as written). */
export interface IReviewSummary {
  /** The review's status; null while the record says nothing about it (no record yet, an older server). */
  readonly status: ReviewStatus | null;
  readonly text: string;
  readonly comment: string | null;
  /** When the reviewers decided (ISO time), or null. */
  readonly decidedAt: string | null;
}

/**
 * The review line of a held, released or rejected job (null for any other state):
 * "held for review by Riverside Hospital — 1 of 2 approvals", "held, not yet sent for review — <note>",
 * "released after review by Riverside Hospital", "rejected in review by Riverside Hospital", with the
 * reviewers' comment for a decided job.
 */
export function reviewSummary(view: IJobView): IReviewSummary | null {
  if (view.state === 'failed') {
    return failureReviewSummary(view);
  }
  if (view.state !== 'held' && !DECIDED.has(view.state)) {
    return null;
  }
  const review = reviewOf(view);
  const by = review ? ` by ${reviewersText(review.reviewers)}` : '';
  const decidedAt = review?.decided_at ?? null;
  if (view.state === 'held') {
    if (review === null) {
      return { status: null, text: 'held for the provider’s review', comment: null, decidedAt };
    }
    const note = review.note ? ` — ${review.note}` : '';
    switch (review.status) {
      case 'unsent':
        return { status: 'unsent', text: `held, not yet sent for review${note}`, comment: null, decidedAt };
      case 'waiting':
        return {
          status: 'waiting',
          text: `held for review${by} — ${approvalsText(review)}`,
          comment: null,
          decidedAt
        };
      case 'released':
        // Decided in the hub; the server is opening the outputs (the job moves to released next).
        return {
          status: 'released',
          text: `approved${by}, opening the outputs`,
          comment: review.comment,
          decidedAt
        };
      case 'rejected':
        return { status: 'rejected', text: `rejected in review${by}`, comment: review.comment, decidedAt };
    }
  }
  const verb = view.state === 'released' ? 'released after review' : 'rejected in review';
  return {
    status: review?.status ?? null,
    text: `${verb}${by}`,
    comment: review?.comment ?? null,
    decidedAt
  };
}

/**
 * A failed run whose full failure (its traceback) the enclave sealed for the provider's reviewers: where
 * that review stands. ``null`` for a failed job without one.
 */
function failureReviewSummary(view: IJobView): IReviewSummary | null {
  const review = reviewOf(view);
  if (review === null) {
    return null;
  }
  const by = ` by ${reviewersText(review.reviewers)}`;
  const decidedAt = review.decided_at ?? null;
  switch (review.status) {
    case 'unsent': {
      const note = review.note ? ` — ${review.note}` : '';
      return { status: 'unsent', text: `traceback not yet sent for review${note}`, comment: null, decidedAt };
    }
    case 'waiting':
      return {
        status: 'waiting',
        text: `traceback held for review${by} — ${approvalsText(review)}`,
        comment: null,
        decidedAt
      };
    case 'released':
      return { status: 'released', text: `traceback released${by}`, comment: review.comment, decidedAt };
    case 'rejected':
      return { status: 'rejected', text: `traceback withheld${by}`, comment: review.comment, decidedAt };
  }
}

/** The failed run's full failure, once the provider's reviewers released it. */
export function failureDetailOf(view: IJobView): { evalue: string; traceback: string } | null {
  if (view.state !== 'failed') {
    return null;
  }
  return view.job?.failure?.detail ?? null;
}

/**
 * Why the job did not succeed, for a failed job (its record's failure, else its event's reason) and for a
 * rejected one that carries a failure (its record's only: a rejection's event reason is not a failure).
 */
export function failureOf(view: IJobView): string | null {
  if (view.state === 'failed') {
    return failureText(view.reason, view.job?.failure);
  }
  if (view.state === 'rejected') {
    return failureText(null, view.job?.failure);
  }
  return null;
}

/** A notification of a job's end or review: what it says and how it looks. */
export interface INotice {
  readonly message: string;
  readonly type: 'success' | 'error' | 'info' | 'warning';
}

/**
 * The notification of `view` (an ended, held or decided job): "Enclave job analysis.ipynb: succeeded",
 * "…: held for review by Riverside Hospital — 0 of 1 approval", "…: rejected in review by Riverside
 * Hospital: “too few rows per cell”", "…: failed: <reason> in code cell 2 (ValueError)".
 */
export function noticeOf(view: IJobView): INotice {
  const name = view.job ? (view.job.notebook.split('/').pop() as string) : view.id;
  const review = reviewSummary(view);
  let what = review ? review.text : stateLabel(view.state);
  if (review?.comment) {
    what += `: “${review.comment}”`;
  }
  const failure = failureOf(view);
  if (failure) {
    what += `: ${failure}`;
  }
  const type =
    view.state === 'succeeded' || view.state === 'released'
      ? 'success'
      : view.state === 'failed' || view.state === 'rejected'
        ? 'error'
        : view.state === 'held'
          ? 'info'
          : 'warning';
  return { message: `Enclave job ${name}: ${what}`, type };
}

export interface IProgress {
  /** Cells executed (finished) so far. */
  readonly done: number;
  readonly total: number;
  /** done / total, 0..1. */
  readonly fraction: number;
  /** "cell 3 of 7" while running, "7 of 7 cells" once executed. */
  readonly label: string;
}

/**
 * Executed cells: while cell i runs, i cells are done; once the job is past running (checking, or
 * ended successfully) all are. A failed or cancelled job keeps the count it reached. Null before the
 * enclave knows how many cells there are.
 */
export function progressOf(view: IJobView): IProgress | null {
  const total = view.cells;
  if (total === null || total <= 0) {
    return null;
  }
  const current = view.cell === null ? null : Math.min(view.cell, total - 1);
  const finished =
    view.state === 'checking' ||
    view.state === 'succeeded' ||
    view.state === 'held' ||
    view.state === 'released' ||
    view.state === 'rejected';
  const done = finished ? total : current === null ? 0 : current;
  const label =
    !finished && view.state === 'running' && current !== null
      ? `cell ${current + 1} of ${total}`
      : `${done} of ${total} cells`;
  return { done, total, fraction: done / total, label };
}

/**
 * Milliseconds the job has taken: from its creation to now while it runs, to its last update once it
 * has ended. Null without a record (no creation time yet).
 */
export function elapsedMs(view: IJobView, now: number): number | null {
  if (view.job === null) {
    return null;
  }
  const start = Date.parse(view.job.created);
  if (Number.isNaN(start)) {
    return null;
  }
  const ended = hasEnded(view.state);
  const end = ended && view.job.state === view.state ? Date.parse(view.job.updated) : now;
  return Math.max(0, (Number.isNaN(end) ? now : end) - start);
}

/** "0:07", "12:03", "1:02:03". */
export function formatElapsed(ms: number | null): string {
  if (ms === null) {
    return '–';
  }
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** States whose outputs are opened in the server root (the executed notebook, the output files). */
export function hasOutputs(state: JobState): boolean {
  return state === 'succeeded' || state === 'released';
}

/** Whether the job may still be cancelled. */
export function canCancel(view: IJobView): boolean {
  return !hasEnded(view.state);
}

/**
 * The name of the executed notebook's marked copy, which the server writes beside the outputs
 * (dcr_server_ext/executed.py): `analysis.ipynb` of `job-1a2b3c4d…` → `analysis.enclave-1a2b3c4d.ipynb`,
 * so its tab can never be mistaken for the notebook that was submitted.
 */
export function executedCopyName(notebook: string, jobId: string): string {
  const name = notebook.split('/').pop() as string;
  const stem = name.includes('.') ? name.slice(0, name.lastIndexOf('.')) : name;
  return `${stem}.enclave-${jobId.replace(/^job-/, '').slice(0, 8)}.ipynb`;
}

/**
 * Where the executed notebook to open is in the server root once the outputs are there: the marked copy,
 * `<outputs_path>/<stem>.enclave-<8 hex>.ipynb` (see `executedCopyName`).
 */
export function executedNotebookPath(job: IJob): string | null {
  if (!job.outputs_path) {
    return null;
  }
  return `${job.outputs_path}/${executedCopyName(job.notebook, job.id)}`;
}

/**
 * The notebook exactly as the enclave returned it, `<outputs_path>/outputs/<notebook's name>` (the enclave
 * runs the notebook in its own directory): opened when a job finished before marked copies existed.
 */
export function enclaveOutputNotebookPath(job: IJob): string | null {
  if (!job.outputs_path) {
    return null;
  }
  const name = job.notebook.split('/').pop() as string;
  return `${job.outputs_path}/outputs/${name}`;
}

/** What a notebook's metadata says about an enclave run: the job it came from, or null for any other. */
export function enclaveRunOf(metadata: unknown): { jobId: string } | null {
  if (typeof metadata !== 'object' || metadata === null) {
    return null;
  }
  const dcr = (metadata as Record<string, unknown>).dcr;
  if (typeof dcr !== 'object' || dcr === null) {
    return null;
  }
  const { job_id: jobId, executed_in_enclave: executed } = dcr as Record<string, unknown>;
  return executed === true && typeof jobId === 'string' && JOB_ID_RE.test(jobId) ? { jobId } : null;
}

/**
 * For the path of a marked copy (`…/job-<id>/<stem>.enclave-<8 hex>.ipynb`), the enclave's own notebook
 * beside it (`…/job-<id>/outputs/<stem>.ipynb`); null for any other path.
 */
export function enclaveOutputOfCopy(path: string): string | null {
  const m = /^(.*\/)?(job-([0-9a-f]{24}))\/([^/]+)\.enclave-([0-9a-f]{8})\.ipynb$/.exec(path);
  if (!m || !m[3].startsWith(m[5])) {
    return null;
  }
  return `${m[1] ?? ''}${m[2]}/outputs/${m[4]}.ipynb`;
}
