/**
 * The banner over a notebook that ran in the enclave: which job, that it ran on the real data, and the
 * way to its receipt. Shown for any notebook whose metadata names an enclave run (the server writes it into
 * the executed notebook's marked copy, dcr_server_ext/executed.py), in the panel's content header, so it
 * stays in view while the notebook scrolls; the tab gets a class of its own as well.
 */

import { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { enclaveRunOf } from './model';

export const BANNER_CLASS = 'jp-DCR-enclave-banner';
export const TAB_CLASS = 'jp-DCR-enclave-tab';

export function createEnclaveBanner(jobId: string, viewReceipt: (jobId: string) => void): Widget {
  const node = document.createElement('div');
  node.className = BANNER_CLASS;
  node.dataset.testid = 'dcr-enclave-banner';
  node.dataset.jobId = jobId;
  const text = document.createElement('span');
  text.className = 'jp-DCR-enclave-banner-text';
  text.textContent = `Executed in the enclave on the real data \u2014 job ${jobId}`;
  const button = document.createElement('button');
  button.className = 'jp-Button jp-mod-styled jp-mod-small';
  button.dataset.testid = 'dcr-banner-receipt';
  button.textContent = 'View receipt';
  button.title = `Open the receipt of ${jobId} and its verification`;
  button.addEventListener('click', () => viewReceipt(jobId));
  node.append(text, button);
  return new Widget({ node });
}

/** Adds the banner to `panel` once its notebook is loaded, if the notebook is an enclave run. */
export function markEnclaveRun(panel: NotebookPanel, viewReceipt: (jobId: string) => void): void {
  void panel.context.ready.then(() => {
    const dcr: unknown = panel.context.model.getMetadata('dcr');
    const run = enclaveRunOf({ dcr });
    if (!run || panel.isDisposed) {
      return;
    }
    panel.contentHeader.addWidget(createEnclaveBanner(run.jobId, viewReceipt));
    // A class, not a label: a document's tab label is its file name (changing it renames the file).
    if (!panel.title.className.includes(TAB_CLASS)) {
      panel.title.className = `${panel.title.className} ${TAB_CLASS}`.trim();
    }
  });
}
