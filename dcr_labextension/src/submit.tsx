/**
 * "Submit to enclave": save the notebook, show what will be submitted (the bundled files and their size,
 * the bundle digest, the datasets the grant will be asked for, with their release mode and protection),
 * then submit it and put the new job into the jobs panel.
 *
 * What is shown comes from the server's dry run (`POST /dcr/api/jobs?dry_run=1`): the same walk, patterns
 * and limits as the submission, so refusals (a hidden path, a workspace too large) appear before the
 * user confirms, in the server's words.
 */

import { Dialog, Notification, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { Contents } from '@jupyterlab/services';
import { NotebookPanel } from '@jupyterlab/notebook';
import { ReactWidget } from '@jupyterlab/ui-components';
import React from 'react';

import { DCRClient, errorMessage } from './api';
import { baseName, formatBytes, protectionLabel, shortDigest } from './format';
import { JobsModel } from './jobs';
import { IDataset, IJob, ISubmitPreview } from './types';

/** How many bundled files the dialog lists by name. */
const MAX_LISTED_FILES = 100;

export interface ISubmitOptions {
  client: DCRClient;
  model: JobsModel;
  contents: Contents.IManager;
  /** Called with the new job (e.g. to show the jobs panel). */
  onSubmitted?: (job: IJob) => void;
}

/** The whole flow for one notebook panel; resolves to the job, or null if refused or abandoned. */
export async function submitNotebook(panel: NotebookPanel, options: ISubmitOptions): Promise<IJob | null> {
  const { client, model, contents } = options;
  const context = panel.context;
  await context.ready;
  // The server root path of the notebook (without a drive prefix such as "RTC:").
  const path = contents.localPath(context.path);
  if (context.model.dirty) {
    try {
      await context.save();
    } catch (error) {
      await showErrorMessage('Submit to Enclave', `The notebook could not be saved: ${errorMessage(error)}`);
      return null;
    }
  }

  const [preview, datasets] = await Promise.all([
    client.preview(path).then(
      value => ({ value, error: null as string | null }),
      error => ({ value: null, error: errorMessage(error) })
    ),
    client.datasets().then(
      value => ({ value, error: null as string | null }),
      error => ({ value: null as IDataset[] | null, error: errorMessage(error) })
    )
  ]);
  if (preview.value === null) {
    await showErrorMessage('Cannot submit this notebook', preview.error ?? 'unknown error');
    return null;
  }

  const body = ReactWidget.create(
    <SubmitSummary preview={preview.value} datasets={datasets.value} datasetsError={datasets.error} />
  );
  body.addClass('jp-DCR-submit-dialog');
  const answer = await showDialog({
    title: 'Submit to Enclave',
    body,
    buttons: [
      Dialog.cancelButton(),
      Dialog.okButton({
        label: 'Submit',
        ariaLabel: 'Submit to the enclave',
        className: 'jp-DCR-submit-confirm'
      })
    ]
  });
  if (!answer.button.accept) {
    return null;
  }

  const pending = Notification.emit(`Submitting ${baseName(path)} to the enclave…`, 'in-progress', {
    autoClose: false
  });
  try {
    const job = await client.submit(path);
    model.upsert(job);
    Notification.update({
      id: pending,
      message: `${baseName(path)} submitted as ${job.id}.`,
      type: 'success',
      autoClose: 5000
    });
    options.onSubmitted?.(job);
    return job;
  } catch (error) {
    Notification.dismiss(pending);
    await showErrorMessage('Submission refused', errorMessage(error));
    return null;
  }
}

function SubmitSummary(props: {
  preview: ISubmitPreview;
  datasets: IDataset[] | null;
  datasetsError: string | null;
}): JSX.Element {
  const { preview, datasets } = props;
  const known = new Map((datasets ?? []).map(d => [`${d.provider}/${d.dataset}`, d]));
  const names = preview.datasets_from === 'entitled' ? [...known.keys()] : preview.datasets;
  const review = names.some(n => known.get(n)?.release === 'review');
  return (
    <div className="jp-DCR-submit-summary" data-testid="dcr-submit-summary">
      <p>
        The notebook runs <strong>unchanged</strong> on the <strong>real</strong> data inside the enclave. You
        get back the executed notebook and the files it writes
        {review ? ', after the data provider’s review' : ''}, with a receipt.
      </p>
      <dl className="jp-DCR-facts">
        <dt>Notebook</dt>
        <dd>
          <code data-testid="dcr-submit-notebook">{preview.notebook}</code>
        </dd>
        <dt>Files</dt>
        <dd data-testid="dcr-submit-files">
          {preview.bundle.files} file{preview.bundle.files === 1 ? '' : 's'},{' '}
          {formatBytes(preview.bundle.bytes)}
        </dd>
        <dt>Bundle</dt>
        <dd>
          <code title={preview.bundle.digest}>{shortDigest(preview.bundle.digest, 16)}</code>
        </dd>
      </dl>
      <details className="jp-DCR-details">
        <summary>Files in the bundle (the notebook’s folder)</summary>
        <ul className="jp-DCR-file-list">
          {preview.files.slice(0, MAX_LISTED_FILES).map(f => (
            <li key={f.path}>
              <code>{f.path}</code> <span className="jp-DCR-note">{formatBytes(f.size)}</span>
            </li>
          ))}
          {preview.files.length > MAX_LISTED_FILES && (
            <li className="jp-DCR-note">and {preview.files.length - MAX_LISTED_FILES} more</li>
          )}
        </ul>
      </details>
      <h3>Datasets</h3>
      <p className="jp-DCR-note">
        {preview.datasets_from === 'references' && 'The /data paths the notebook uses:'}
        {preview.datasets_from === 'request' && 'The datasets asked for:'}
        {preview.datasets_from === 'entitled' &&
          'The notebook names no /data/<provider>/<dataset> path, so every dataset you are entitled to is asked for:'}
      </p>
      {props.datasetsError && <div className="jp-DCR-error">{props.datasetsError}</div>}
      <ul className="jp-DCR-file-list" data-testid="dcr-submit-datasets">
        {names.map(name => {
          const d = known.get(name);
          return (
            <li key={name}>
              <code>{name}</code>
              {d && (
                <span className="jp-DCR-note">
                  {' '}
                  {shortDigest(d.version)} ·{' '}
                  {d.release === 'review' ? 'reviewed release' : 'automatic release'} · {protectionLabel(d)}
                </span>
              )}
              {!d && datasets !== null && (
                <span className="jp-DCR-note"> (not in your datasets: the hub decides)</span>
              )}
            </li>
          );
        })}
        {names.length === 0 && <li className="jp-DCR-note">none</li>}
      </ul>
    </div>
  );
}
