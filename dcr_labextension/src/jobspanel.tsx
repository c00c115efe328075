/**
 * The left sidebar: the enclave jobs (live state, elapsed time, cell progress, cancel, outputs, receipt)
 * and the datasets the user may submit with, as two sections of one JupyterLab side panel.
 *
 * The jobs section renders the `JobsModel` state; it re-renders when the model changes (pushed events)
 * and once a second while a job runs, for the elapsed time (a local clock: no request is made).
 */

import { showDialog, showErrorMessage, Dialog } from '@jupyterlab/apputils';
import {
  Button,
  ReactWidget,
  SidePanel,
  Toolbar,
  ToolbarButton,
  downloadIcon,
  refreshIcon
} from '@jupyterlab/ui-components';
import { Message } from '@lumino/messaging';
import React, { useEffect, useState } from 'react';

import { DCRClient, errorMessage, saveBlob } from './api';
import { baseName, formatBytes, protectionLabel, safeLink, shortDigest, stateLabel } from './format';
import { enclaveIcon } from './icons';
import { JobsModel, PAGE_SIZE } from './jobs';
import {
  IJobView,
  canCancel,
  elapsedMs,
  executedNotebookPath,
  failureDetailOf,
  failureOf,
  formatElapsed,
  hasEnded,
  hasOutputs,
  listedOf,
  orderedJobs,
  progressOf,
  reviewSummary
} from './model';
import { IDataset, IOutputFile, JobState } from './types';

/** What the panel asks the application to do. */
export interface IJobActions {
  openNotebook(path: string): void;
  viewReceipt(jobId: string): void;
}

/** Ids of the DOM the browser tests use (documented in docs/labextension.md). */
export const PANEL_ID = 'dcr-jobs-panel';

const WAITING: Partial<Record<JobState, string>> = {
  submitted: 'asking the hub for a grant',
  granted: 'waiting for the enclave',
  launching: 'launching the enclave',
  running: 'starting the kernel on the real data',
  checking: 'checking the outputs',
  held: 'outputs held for the provider’s review',
  cancelled: 'cancelled',
  failed: 'failed',
  released: 'outputs released after review',
  rejected: 'outputs rejected in review'
};

/** Build the sidebar: a side panel with the jobs and datasets sections. */
export function createSidebar(model: JobsModel, client: DCRClient, actions: IJobActions): SidePanel {
  const panel = new SidePanel();
  panel.id = PANEL_ID;
  panel.addClass('jp-DCR-sidebar');
  panel.node.dataset.testid = PANEL_ID;
  panel.node.setAttribute('aria-label', 'Enclave jobs and datasets');
  panel.title.icon = enclaveIcon;
  panel.title.caption = 'Enclave jobs';

  const header = document.createElement('h2');
  header.className = 'jp-DCR-sidebar-title';
  header.textContent = 'Data Clean Room';
  panel.header.node.appendChild(header);

  const jobs = new JobsView(model, actions);
  const datasets = new DatasetsView(client);
  panel.addWidget(jobs);
  panel.addWidget(datasets);
  return panel;
}

/** The jobs section. */
export class JobsView extends ReactWidget {
  readonly toolbar = new Toolbar();

  constructor(
    private readonly _model: JobsModel,
    private readonly _actions: IJobActions
  ) {
    super();
    this.addClass('jp-DCR-jobs');
    this.title.label = 'Jobs';
    this.node.dataset.testid = 'dcr-jobs';
    this.toolbar.addItem(
      'refresh',
      new ToolbarButton({
        icon: refreshIcon,
        tooltip: 'Reload the job list',
        dataset: { testid: 'dcr-refresh-jobs' },
        onClick: () => void this._model.refresh()
      })
    );
    this._model.changed.connect(this._onChanged, this);
  }

  dispose(): void {
    this._model.changed.disconnect(this._onChanged, this);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    // Events missed while the panel was hidden or the socket was down come back with one listing.
    void this._model.refresh();
  }

  private _onChanged(): void {
    this.update();
  }

  render(): JSX.Element {
    return <JobList model={this._model} actions={this._actions} />;
  }
}

function JobList(props: { model: JobsModel; actions: IJobActions }): JSX.Element {
  const state = props.model.state;
  const views = orderedJobs(state);
  const now = useClock(views.some(v => !hasEnded(v.state)));
  return (
    <div className="jp-DCR-jobs-body">
      {state.error !== null && (
        <div className="jp-DCR-error" role="alert" data-testid="dcr-jobs-error">
          {state.error}
        </div>
      )}
      {!state.loaded && state.error === null && <div className="jp-DCR-empty">Loading jobs…</div>}
      {state.loaded && views.length === 0 && (
        <div className="jp-DCR-empty">
          No jobs yet. Open a notebook and choose <strong>Submit to Enclave</strong> in its toolbar.
        </div>
      )}
      <ul className="jp-DCR-job-list" aria-label="Enclave jobs">
        {views.map(view => (
          <JobItem key={view.id} view={view} now={now} model={props.model} actions={props.actions} />
        ))}
      </ul>
      <Paging model={props.model} />
    </div>
  );
}

/** Below a partial list: how many jobs are shown of how many, and buttons to list the older ones. */
function Paging(props: { model: JobsModel }): JSX.Element | null {
  const [busy, setBusy] = useState(false);
  const listed = listedOf(props.model.state);
  if (listed === null) {
    return null;
  }
  const load = async (what: () => Promise<unknown>): Promise<void> => {
    setBusy(true);
    try {
      await what(); // a failure shows as the list's error
    } finally {
      setBusy(false);
    }
  };
  const next = Math.min(PAGE_SIZE, listed.total - listed.shown);
  return (
    <div className="jp-DCR-paging" data-testid="dcr-jobs-paging">
      <span data-testid="dcr-jobs-shown" data-shown={listed.shown} data-total={listed.total}>
        Showing the newest {listed.shown} of {listed.total} jobs.
      </span>
      <Button
        small
        minimal
        data-testid="dcr-load-more-jobs"
        disabled={busy}
        onClick={() => void load(() => props.model.loadMore())}
      >
        Load {next} more
      </Button>
      <Button
        small
        minimal
        data-testid="dcr-load-all-jobs"
        disabled={busy}
        onClick={() => void load(() => props.model.loadAll())}
      >
        Load all
      </Button>
    </div>
  );
}

/** The current time, ticking once a second while `running` (for elapsed times only). */
function useClock(running: boolean): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    if (!running) {
      return;
    }
    const timer = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(timer);
  }, [running]);
  return running ? Math.max(now, Date.now()) : now;
}

function JobItem(props: {
  view: IJobView;
  now: number;
  model: JobsModel;
  actions: IJobActions;
}): JSX.Element {
  const { view, actions, model } = props;
  const job = view.job;
  const [busy, setBusy] = useState(false);
  const [outputs, setOutputs] = useState<IOutputFile[] | null>(null);
  const [showOutputs, setShowOutputs] = useState(false);
  const progress = progressOf(view);
  const failure = failureOf(view);
  const detail = failureDetailOf(view);
  const notebook = job?.notebook ?? view.id;
  const executed = job && hasOutputs(view.state) ? executedNotebookPath(job) : null;

  const cancel = async (): Promise<void> => {
    const answer = await showDialog({
      title: 'Cancel enclave job?',
      body: `${baseName(notebook)} (${view.id}) will be stopped, with everything it runs in the enclave.`,
      buttons: [
        Dialog.cancelButton({ label: 'Keep running' }),
        Dialog.warnButton({ label: 'Cancel job', className: 'jp-DCR-cancel-confirm' })
      ]
    });
    if (!answer.button.accept) {
      return;
    }
    setBusy(true);
    try {
      await model.cancel(view.id);
    } catch (error) {
      await showErrorMessage('Cancel failed', errorMessage(error));
    } finally {
      setBusy(false);
    }
  };

  const toggleOutputs = async (): Promise<void> => {
    if (showOutputs) {
      setShowOutputs(false);
      return;
    }
    setShowOutputs(true);
    try {
      setOutputs(await model.client.outputs(view.id));
    } catch (error) {
      setShowOutputs(false);
      await showErrorMessage('Outputs unavailable', errorMessage(error));
    }
  };

  const download = async (file: IOutputFile): Promise<void> => {
    try {
      saveBlob(await model.client.outputFile(view.id, file.path), baseName(file.path));
    } catch (error) {
      await showErrorMessage('Download failed', errorMessage(error));
    }
  };

  return (
    <li
      className={`jp-DCR-job jp-DCR-state-${view.state}`}
      data-testid={`dcr-job-${view.id}`}
      data-state={view.state}
      aria-label={`${baseName(notebook)}: ${stateLabel(view.state)}`}
    >
      <div className="jp-DCR-job-header">
        <span className="jp-DCR-job-name" title={`${notebook}\n${view.id}`}>
          {baseName(notebook)}
        </span>
        <span className="jp-DCR-badge" data-testid="dcr-job-state" data-state={view.state}>
          {stateLabel(view.state)}
        </span>
      </div>
      <div className="jp-DCR-job-meta">
        <span title="Elapsed time" data-testid="dcr-elapsed">
          {formatElapsed(elapsedMs(view, props.now))}
        </span>
        <span className="jp-DCR-job-id" title={view.id}>
          {view.id.slice(0, 12)}…
        </span>
        {job?.enclave?.simulated && (
          <span className="jp-DCR-tag" title="Local simulated enclave: no hardware TEE">
            simulated
          </span>
        )}
      </div>
      <ProgressBar view={view} progress={progress} />
      <ReviewLine view={view} />
      {failure && (
        <div className="jp-DCR-failure" role="alert" data-testid="dcr-failure">
          {failure}
        </div>
      )}
      {detail && (
        <details className="jp-DCR-failure-detail" data-testid="dcr-failure-detail">
          <summary>Traceback (released by the reviewers)</summary>
          <pre>{detail.traceback || detail.evalue}</pre>
        </details>
      )}
      <div className="jp-DCR-job-actions">
        {canCancel(view) && (
          <Button
            small
            minimal
            data-testid="dcr-cancel"
            aria-label={`Cancel ${view.id}`}
            disabled={busy}
            onClick={() => void cancel()}
          >
            Cancel
          </Button>
        )}
        {executed && (
          <Button
            small
            minimal
            data-testid="dcr-open-notebook"
            aria-label={`Open the executed notebook of ${view.id}`}
            onClick={() => actions.openNotebook(executed)}
          >
            Open notebook
          </Button>
        )}
        {job?.outputs_path && view.state !== 'held' && (
          <Button
            small
            minimal
            data-testid="dcr-outputs"
            aria-expanded={showOutputs}
            aria-label={`Output files of ${view.id}`}
            onClick={() => void toggleOutputs()}
          >
            Outputs
          </Button>
        )}
        {job?.receipt && (
          <Button
            small
            minimal
            data-testid="dcr-view-receipt"
            aria-label={`View the receipt of ${view.id}`}
            onClick={() => actions.viewReceipt(view.id)}
          >
            Receipt
          </Button>
        )}
      </div>
      {showOutputs && (
        <ul className="jp-DCR-outputs" aria-label={`Output files of ${view.id}`}>
          {outputs === null && <li className="jp-DCR-empty">Loading…</li>}
          {outputs?.length === 0 && <li className="jp-DCR-empty">No output files.</li>}
          {outputs?.map(file => (
            <li key={file.path} className="jp-DCR-output" data-testid="dcr-output">
              <span className="jp-DCR-output-path" title={`${file.path}\n${file.sha256}`}>
                {file.path}
              </span>
              <span className="jp-DCR-output-size">{formatBytes(file.size)}</span>
              <button
                className="jp-DCR-icon-button"
                data-testid="dcr-download-output"
                aria-label={`Download ${file.path}`}
                title={`Download ${file.path}`}
                onClick={() => void download(file)}
              >
                <downloadIcon.react tag="span" />
              </button>
            </li>
          ))}
        </ul>
      )}
    </li>
  );
}

/** A held job's review (who must decide, approvals so far, or why it is not sent yet) and its outcome. */
function ReviewLine(props: { view: IJobView }): JSX.Element | null {
  const review = reviewSummary(props.view);
  if (review === null) {
    return null;
  }
  const decided = review.decidedAt ? `decided ${review.decidedAt}` : undefined;
  return (
    <div
      className={`jp-DCR-review jp-DCR-review-${review.status ?? 'pending'}`}
      data-testid="dcr-review"
      data-status={review.status ?? ''}
      role={props.view.state === 'held' ? 'status' : undefined}
      title={decided}
    >
      <span className="jp-DCR-review-text">{review.text}</span>
      {review.comment && (
        <blockquote className="jp-DCR-review-comment" data-testid="dcr-review-comment">
          {review.comment}
        </blockquote>
      )}
    </div>
  );
}

function ProgressBar(props: { view: IJobView; progress: ReturnType<typeof progressOf> }): JSX.Element {
  const { view, progress } = props;
  const label = progress ? progress.label : (WAITING[view.state] ?? view.state);
  const percent = progress ? Math.round(progress.fraction * 100) : 0;
  return (
    <div className="jp-DCR-progress-row">
      <div
        className="jp-DCR-progress"
        role="progressbar"
        aria-label={`Executed cells of ${view.id}`}
        aria-valuemin={0}
        aria-valuemax={progress ? progress.total : 1}
        aria-valuenow={progress ? progress.done : 0}
        aria-valuetext={label}
        data-testid="dcr-progress"
        data-done={progress ? progress.done : 0}
        data-total={progress ? progress.total : 0}
      >
        <div className="jp-DCR-progress-fill" style={{ width: `${percent}%` }} />
      </div>
      <span className="jp-DCR-progress-label">{label}</span>
    </div>
  );
}

/** The datasets section: what the user may submit with, and how its synthetic version protects it. */
export class DatasetsView extends ReactWidget {
  readonly toolbar = new Toolbar();

  constructor(private readonly _client: DCRClient) {
    super();
    this.addClass('jp-DCR-datasets');
    this.title.label = 'Datasets';
    this.node.dataset.testid = 'dcr-datasets';
    this.toolbar.addItem(
      'refresh',
      new ToolbarButton({
        icon: refreshIcon,
        tooltip: 'Reload the datasets',
        dataset: { testid: 'dcr-refresh-datasets' },
        onClick: () => void this.load()
      })
    );
  }

  async load(): Promise<void> {
    this._loading = true;
    this.update();
    try {
      this._datasets = await this._client.datasets();
      this._error = null;
    } catch (error) {
      this._error = errorMessage(error);
    } finally {
      this._loading = false;
      this.update();
    }
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    if (this._datasets === null && !this._loading) {
      void this.load();
    }
  }

  render(): JSX.Element {
    return (
      <div className="jp-DCR-datasets-body">
        {this._error !== null && (
          <div className="jp-DCR-error" role="alert" data-testid="dcr-datasets-error">
            {this._error}
          </div>
        )}
        {this._loading && this._datasets === null && <div className="jp-DCR-empty">Loading datasets…</div>}
        {this._datasets?.length === 0 && <div className="jp-DCR-empty">No dataset is available to you.</div>}
        <ul className="jp-DCR-dataset-list" aria-label="Datasets">
          {this._datasets?.map(d => (
            <DatasetItem key={`${d.provider}/${d.dataset}`} dataset={d} />
          ))}
        </ul>
      </div>
    );
  }

  private _datasets: IDataset[] | null = null;
  private _error: string | null = null;
  private _loading = false;
}

function DatasetItem(props: { dataset: IDataset }): JSX.Element {
  const d = props.dataset;
  const report = safeLink(d.fidelity_report);
  return (
    <li className="jp-DCR-dataset" data-testid={`dcr-dataset-${d.provider}-${d.dataset}`}>
      <div className="jp-DCR-job-header">
        <span className="jp-DCR-job-name">
          {d.provider}/{d.dataset}
        </span>
        {d.release && (
          <span
            className={`jp-DCR-badge jp-DCR-release-${d.release}`}
            title={
              d.release === 'review'
                ? 'Outputs wait for the provider’s review before you get them'
                : 'Outputs come back as soon as the job ends'
            }
          >
            {d.release === 'review' ? 'reviewed' : 'auto release'}
          </span>
        )}
      </div>
      {d.description && <div className="jp-DCR-dataset-description">{d.description}</div>}
      <dl className="jp-DCR-facts">
        <dt>Provider</dt>
        <dd>{d.provider}</dd>
        <dt>Version</dt>
        <dd title={d.version ?? ''}>
          <code>{shortDigest(d.version)}</code>
        </dd>
        <dt>Protection</dt>
        <dd data-testid="dcr-dataset-protection">{protectionLabel(d)}</dd>
        {d.files.length > 0 && <dt>Files</dt>}
        {d.files.length > 0 && (
          <dd>
            {d.files.map(f => (
              <div
                key={f.name}
                title={f.synthetic_size !== null ? `synthetic: ${formatBytes(f.synthetic_size)}` : ''}
              >
                <code>{f.path}</code>
              </div>
            ))}
          </dd>
        )}
      </dl>
      {report && (
        <a
          className="jp-DCR-link"
          href={report}
          target="_blank"
          rel="noopener noreferrer"
          data-testid="dcr-fidelity-report"
        >
          Fidelity report
        </a>
      )}
    </li>
  );
}
