/**
 * The client of the DCR server extension's REST API (`/dcr/api`, dcr_server_ext/openapi.yaml).
 *
 * Every request goes through `ServerConnection.makeRequest`, so the server's base URL, the XSRF header
 * and JupyterHub's authentication are handled exactly as for JupyterLab's own requests. Refusals are
 * thrown as `DCRRequestError` carrying the server's own message (`{"error": "..."}`).
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IDataset, IJob, IJobList, IOutputFile, IReceipt, ISubmitPreview, IVerification } from './types';

/** A refused or failed request; `message` is what the server wrote. */
export class DCRRequestError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
    this.name = 'DCRRequestError';
  }
}

/** The message of any error, for display. */
export function errorMessage(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

function encodePath(path: string): string {
  return path
    .split('/')
    .map(part => encodeURIComponent(part))
    .join('/');
}

export class DCRClient {
  constructor(readonly serverSettings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  /** `GET /dcr/api/jobs`: a page of jobs, newest first. */
  listJobs(offset = 0, limit = 200): Promise<IJobList> {
    return this.json(`jobs?offset=${offset}&limit=${limit}`);
  }

  getJob(id: string): Promise<IJob> {
    return this.json(`jobs/${encodeURIComponent(id)}`);
  }

  /** `POST /dcr/api/jobs`: submit a notebook (path relative to the server root). */
  submit(path: string, datasets?: string[]): Promise<IJob> {
    return this.json('jobs', {
      method: 'POST',
      body: JSON.stringify(datasets ? { path, datasets } : { path })
    });
  }

  /** `POST /dcr/api/jobs?dry_run=1`: what a submission would bundle and ask for; changes nothing. */
  preview(path: string, datasets?: string[]): Promise<ISubmitPreview> {
    return this.json('jobs?dry_run=1', {
      method: 'POST',
      body: JSON.stringify(datasets ? { path, datasets } : { path })
    });
  }

  cancel(id: string): Promise<IJob> {
    return this.json(`jobs/${encodeURIComponent(id)}/cancel`, { method: 'POST', body: '{}' });
  }

  async outputs(id: string): Promise<IOutputFile[]> {
    const doc = await this.json<{ files: IOutputFile[] }>(`jobs/${encodeURIComponent(id)}/outputs`);
    return doc.files;
  }

  receipt(id: string): Promise<IReceipt> {
    return this.json(`jobs/${encodeURIComponent(id)}/receipt`);
  }

  /** `GET /dcr/api/jobs/<id>/verify`: the checks of `dcr verify` against the deployment's anchors. */
  verify(id: string): Promise<IVerification> {
    return this.json(`jobs/${encodeURIComponent(id)}/verify`);
  }

  async datasets(): Promise<IDataset[]> {
    const doc = await this.json<{ datasets: IDataset[] }>('datasets');
    return doc.datasets;
  }

  /** One output file's bytes (`GET /dcr/api/jobs/<id>/outputs/<path>`). */
  outputFile(id: string, path: string): Promise<Blob> {
    return this.blob(this.url(`jobs/${encodeURIComponent(id)}/outputs/${encodePath(path)}`));
  }

  /** A file of the server root, byte for byte (`/files/<path>`: receipts are downloaded this way). */
  rootFile(path: string): Promise<Blob> {
    return this.blob(URLExt.join(this.serverSettings.baseUrl, 'files', encodePath(path)));
  }

  private url(rest: string): string {
    return URLExt.join(this.serverSettings.baseUrl, 'dcr/api', rest);
  }

  private async request(url: string, init: RequestInit): Promise<Response> {
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, init, this.serverSettings);
    } catch (error) {
      throw new DCRRequestError(`the server cannot be reached: ${errorMessage(error)}`, 0);
    }
    if (!response.ok) {
      throw new DCRRequestError(await Private.refusal(response), response.status);
    }
    return response;
  }

  private async json<T>(rest: string, init: RequestInit = {}): Promise<T> {
    const headers = init.body !== undefined ? { 'Content-Type': 'application/json' } : undefined;
    const response = await this.request(this.url(rest), { ...init, headers });
    return (await response.json()) as T;
  }

  private async blob(url: string): Promise<Blob> {
    const response = await this.request(url, {});
    return response.blob();
  }
}

namespace Private {
  /** The server's own words for a refusal: `{"error": ...}` when there is one. */
  export async function refusal(response: Response): Promise<string> {
    const text = await response.text().catch(() => '');
    try {
      const doc: unknown = JSON.parse(text);
      const error = member(doc, 'error');
      if (error) {
        return error;
      }
      const message = member(doc, 'message');
      if (message) {
        return message; // jupyter_server's own JSON errors
      }
    } catch {
      // not JSON: fall through
    }
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  /** `doc[name]` when `doc` is an object and that member a string, else undefined. */
  function member(doc: unknown, name: string): string | undefined {
    if (doc && typeof doc === 'object') {
      const value = (doc as Record<string, unknown>)[name];
      return typeof value === 'string' ? value : undefined;
    }
    return undefined;
  }
}

/** Save a blob as a download named `name` (the browser's download bar, no navigation). */
export function saveBlob(blob: Blob, name: string): void {
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  a.rel = 'noopener';
  a.style.display = 'none';
  document.body.appendChild(a);
  a.click();
  a.remove();
  // Revoked later: some browsers start reading the blob only after click() has returned.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
