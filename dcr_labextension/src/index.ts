/**
 * The JupyterLab extension of the JupyterHub Data Clean Room.
 *
 * - "Submit to Enclave": a notebook toolbar button (declared in schema/plugin.json's
 *   `jupyter.lab.toolbars`, rendered by the factory registered here), a palette command, the notebook
 *   context menu and the Run menu.
 * - The jobs sidebar: live state, elapsed time and cell progress from the server's event bus, cancel,
 *   the executed notebook, output downloads and the receipt; the datasets the user may submit with.
 * - The receipt viewer (main area), with the server's verification against the deployment's anchors.
 * - A notification when a job ends or is held for review, and when the reviewers release or reject it.
 *
 * Every request goes through `ServerConnection` (api.ts), so XSRF and JupyterHub's auth just work.
 */

import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, IToolbarWidgetRegistry, Notification } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ToolbarButton } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { DCRClient } from './api';
import { enclaveIcon } from './icons';
import { JobsModel } from './jobs';
import { PANEL_ID, createSidebar } from './jobspanel';
import { markEnclaveRun } from './banner';
import {
  IJobView,
  JOB_ID_RE,
  enclaveOutputOfCopy,
  executedNotebookPath,
  hasOutputs,
  noticeOf
} from './model';
import { createReceiptWidget } from './receipt';
import { submitNotebook } from './submit';

const PLUGIN_ID = '@jupyterhub-dcr/labextension:plugin';

export namespace CommandIDs {
  export const submit = 'dcr:submit';
  export const showJobs = 'dcr:show-jobs';
  export const refresh = 'dcr:refresh-jobs';
  export const openReceipt = 'dcr:open-receipt';
}

/** The toolbar item name in schema/plugin.json (`jupyter.lab.toolbars.Notebook`). */
const TOOLBAR_ITEM = 'dcr-submit';

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Submit notebooks to the enclave, follow jobs live, view receipts and datasets.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILayoutRestorer, IToolbarWidgetRegistry, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null,
    toolbarRegistry: IToolbarWidgetRegistry | null,
    settings: ISettingRegistry | null
  ) => {
    const { commands, serviceManager, shell } = app;
    const client = new DCRClient(serviceManager.serverSettings);
    const model = new JobsModel(client, serviceManager.events ?? null);

    const openNotebook = (path: string): void => {
      // A job that ended before marked copies existed has only the enclave's own notebook under outputs/.
      const fallback = enclaveOutputOfCopy(path);
      void serviceManager.contents
        .get(path, { content: false })
        .then(
          () => path,
          () => fallback ?? path
        )
        .then(found => commands.execute('docmanager:open', { path: found }))
        .then(widget => {
          // Only the tooltip: a document's tab label is its file name (changing it renames the file).
          if (widget instanceof Widget) {
            widget.title.caption = `${path}\nThe notebook as the enclave executed it, on the real data`;
          }
        });
    };
    const viewReceipt = (jobId: string): void => {
      void commands.execute(CommandIDs.openReceipt, { jobId });
    };
    // Every notebook that ran in the enclave, however it is opened, says so over its cells.
    tracker.widgetAdded.connect((_, panel) => markEnclaveRun(panel, viewReceipt));

    const sidebar = createSidebar(model, client, { openNotebook, viewReceipt });
    shell.add(sidebar, 'left', { rank: 650 });
    restorer?.add(sidebar, PANEL_ID);

    const submit = async (panel: NotebookPanel | null): Promise<void> => {
      if (!panel) {
        return;
      }
      await submitNotebook(panel, {
        client,
        model,
        contents: serviceManager.contents,
        onSubmitted: () => shell.activateById(PANEL_ID)
      });
    };

    commands.addCommand(CommandIDs.submit, {
      label: 'Submit to Enclave',
      caption: 'Run this notebook, unchanged, on the real data in the enclave',
      icon: args => (args.isPalette ? undefined : enclaveIcon),
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => submit(tracker.currentWidget)
    });
    commands.addCommand(CommandIDs.showJobs, {
      label: 'Show Enclave Jobs',
      caption: 'Open the Data Clean Room sidebar',
      execute: () => shell.activateById(PANEL_ID)
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'Reload Enclave Jobs',
      execute: () => model.refresh()
    });
    commands.addCommand(CommandIDs.openReceipt, {
      label: args =>
        typeof args.jobId === 'string' && args.jobId ? `Receipt of ${args.jobId}` : 'Open Enclave Receipt',
      execute: args => {
        const jobId = typeof args.jobId === 'string' ? args.jobId : '';
        if (!JOB_ID_RE.test(jobId)) {
          return;
        }
        const id = `dcr-receipt-${jobId}`;
        for (const widget of shell.widgets('main')) {
          if (widget.id === id) {
            shell.activateById(id);
            return;
          }
        }
        const widget = createReceiptWidget(jobId, client);
        shell.add(widget, 'main');
        shell.activateById(id);
      }
    });

    if (palette) {
      const category = 'Data Clean Room';
      for (const command of [CommandIDs.submit, CommandIDs.showJobs, CommandIDs.refresh]) {
        palette.addItem({ command, category, args: { isPalette: true } });
      }
    }

    // The toolbar button: rendered here so that it targets its own notebook and carries a test id.
    toolbarRegistry?.addFactory<NotebookPanel>('Notebook', TOOLBAR_ITEM, panel => {
      const button = new ToolbarButton({
        icon: enclaveIcon,
        label: 'Submit to Enclave',
        tooltip: 'Run this notebook, unchanged, on the real data in the enclave',
        dataset: { testid: 'dcr-submit', command: CommandIDs.submit },
        onClick: () => void submit(panel)
      });
      button.addClass('jp-DCR-submit-button');
      return button;
    });
    // Loading the plugin's settings makes the registry apply its toolbar and menu entries.
    if (settings) {
      void settings.load(PLUGIN_ID).catch(reason => console.error('DCR: settings failed to load', reason));
    }

    model.ended.connect((_, view) => notifyEnded(view, openNotebook, viewReceipt));
    void model.refresh();
  }
};

/** One notification per ended, held or reviewed job, with the next useful actions. */
function notifyEnded(
  view: IJobView,
  openNotebook: (path: string) => void,
  viewReceipt: (jobId: string) => void
): void {
  const job = view.job;
  const actions: Notification.IAction[] = [];
  const executed = job && hasOutputs(view.state) ? executedNotebookPath(job) : null;
  if (executed) {
    actions.push({ label: 'Open notebook', callback: () => openNotebook(executed), displayType: 'accent' });
  }
  if (job?.receipt) {
    actions.push({ label: 'View receipt', callback: () => viewReceipt(view.id) });
  }
  const { message, type } = noticeOf(view);
  Notification.emit(message, type, { autoClose: type === 'error' ? false : 8000, actions });
}

export default plugin;
