/**
 * The receipt viewer (a main-area tab): the checks of `dcr verify`, run by the server against the
 * deployment's trust anchors, with pass/fail each; a banner when the enclave was the local simulation;
 * what ran (notebook, bundle, enclave, grant), on which datasets and versions, producing which outputs;
 * every digest with a copy button; and the receipt files for third parties to check with `dcr verify`.
 */

import { Clipboard, MainAreaWidget, showErrorMessage } from '@jupyterlab/apputils';
import {
  Button,
  ReactWidget,
  checkIcon,
  closeIcon,
  copyIcon,
  downloadIcon,
  refreshIcon
} from '@jupyterlab/ui-components';
import React from 'react';

import { DCRClient, errorMessage, saveBlob } from './api';
import { baseName, formatBytes, shortDigest, stateLabel } from './format';
import { enclaveIcon } from './icons';
import { IJob, IOutputFile, IReceipt, IVerification } from './types';

/** The receipt files as the server root holds them (`<outputs_path>/<name>`), what `dcr verify` reads. */
const RECEIPT_FILES = ['receipt.json', 'attestation.jwt', 'signer-jwks.json'];

type Loaded<T> = { value: T; error: null } | { value: null; error: string } | null;

function settle<T>(p: Promise<T>): Promise<Loaded<T>> {
  return p.then(
    value => ({ value, error: null }),
    error => ({ value: null, error: errorMessage(error) })
  );
}

/** The viewer's content; `MainAreaWidget` wraps it (see `createReceiptWidget`). */
export class ReceiptView extends ReactWidget {
  constructor(
    readonly jobId: string,
    private readonly _client: DCRClient
  ) {
    super();
    this.addClass('jp-DCR-receipt');
    this.node.dataset.testid = 'dcr-receipt';
    void this.load();
  }

  /** Fetch the job, receipt, outputs and a fresh verification (each may fail on its own). */
  async load(): Promise<void> {
    this._loading = true;
    this.update();
    const id = this.jobId;
    const [job, receipt, verification, outputs] = await Promise.all([
      settle(this._client.getJob(id)),
      settle(this._client.receipt(id)),
      settle(this._client.verify(id)),
      settle(this._client.outputs(id))
    ]);
    this._job = job;
    this._receipt = receipt;
    this._verification = verification;
    this._outputs = outputs;
    this._loading = false;
    this.update();
  }

  render(): JSX.Element {
    const job = this._job?.value ?? null;
    const receipt = this._receipt?.value ?? null;
    const verification = this._verification?.value ?? null;
    const simulated =
      verification?.simulated === true ||
      job?.enclave?.simulated === true ||
      receipt?.manifest.enclave.kind === 'local';
    return (
      <div className="jp-DCR-receipt-body" aria-busy={this._loading}>
        <header className="jp-DCR-receipt-header">
          <h1>
            Receipt <code>{this.jobId}</code>
          </h1>
          <Button
            small
            minimal
            aria-label="Verify again"
            data-testid="dcr-receipt-reload"
            onClick={() => void this.load()}
          >
            <refreshIcon.react tag="span" /> Check again
          </Button>
        </header>
        {simulated && (
          <div className="jp-DCR-banner jp-DCR-banner-warn" role="note" data-testid="dcr-simulation-banner">
            <strong>Simulated enclave.</strong> This job ran in the local simulation of a trusted execution
            environment: the same isolation, key release and receipts, but no hardware memory encryption. Its
            attestation is signed by the enclave host’s own key; <code>dcr verify --require-hardware</code>{' '}
            rejects it.
          </div>
        )}
        {this._loading && this._verification === null && (
          <div className="jp-DCR-empty">Checking the receipt…</div>
        )}
        <Verdict loaded={this._verification} />
        {this._receipt?.error && (
          <div className="jp-DCR-error" role="alert">
            {this._receipt.error}
          </div>
        )}
        {receipt && (
          <ReceiptDetails
            receipt={receipt}
            job={job}
            outputs={this._outputs?.value ?? null}
            client={this._client}
          />
        )}
        {job?.outputs_path && <Downloads job={job} client={this._client} />}
      </div>
    );
  }

  private _loading = false;
  private _job: Loaded<IJob> = null;
  private _receipt: Loaded<IReceipt> = null;
  private _verification: Loaded<IVerification> = null;
  private _outputs: Loaded<IOutputFile[]> = null;
}

function Verdict(props: { loaded: Loaded<IVerification> }): JSX.Element | null {
  const loaded = props.loaded;
  if (loaded === null) {
    return null;
  }
  if (loaded.error !== null) {
    return (
      <section className="jp-DCR-section" aria-label="Verification">
        <h2>Verification</h2>
        <div className="jp-DCR-error" role="alert" data-testid="dcr-verify-error">
          {loaded.error}
        </div>
      </section>
    );
  }
  const v = loaded.value;
  const failed = v.checks.filter(c => !c.passed).length;
  return (
    <section className="jp-DCR-section" aria-label="Verification">
      <h2>Verification</h2>
      <div
        className={`jp-DCR-banner ${v.verified ? 'jp-DCR-banner-ok' : 'jp-DCR-banner-error'}`}
        role="status"
        data-testid="dcr-receipt-verdict"
        data-verified={v.verified}
      >
        {v.verified
          ? `Verified: all ${v.checks.length} checks passed against this deployment’s trust anchors.`
          : `Not verified: ${failed} of ${v.checks.length} checks failed.`}
      </div>
      {v.note && <div className="jp-DCR-note">{v.note}</div>}
      <ul className="jp-DCR-checks" aria-label="Checks">
        {v.checks.map(c => (
          <li
            key={c.name}
            className={`jp-DCR-check ${c.passed ? 'jp-mod-passed' : 'jp-mod-failed'}`}
            data-testid="dcr-receipt-check"
            data-check={c.name}
            data-passed={c.passed}
          >
            {c.passed ? (
              <checkIcon.react tag="span" className="jp-DCR-check-icon" title="passed" />
            ) : (
              <closeIcon.react tag="span" className="jp-DCR-check-icon" title="failed" />
            )}
            <span className="jp-DCR-check-name">{c.name}</span>
            <span className="jp-DCR-check-verdict">{c.passed ? 'PASS' : 'FAIL'}</span>
            <span className="jp-DCR-check-detail">{c.detail}</span>
          </li>
        ))}
      </ul>
      <div className="jp-DCR-note">
        Checked {v.checked_at} against{' '}
        {v.anchors.map((a, i) => (
          <span key={i} title={a.source}>
            {i > 0 && ', '}
            {a.kind} <code>{a.kind === 'root' ? a.id : shortDigest(a.id)}</code>
          </span>
        ))}
        {v.enclave_digests.length > 0 ? ', enclave ' : ', no pinned enclave digest'}
        {v.enclave_digests.map((d, i) => (
          <span key={d}>
            {i > 0 && ', '}
            <code title={d}>{shortDigest(d)}</code>
          </span>
        ))}
        .
      </div>
    </section>
  );
}

function Digest(props: { value: string | null | undefined; label: string }): JSX.Element {
  const value = props.value ?? '';
  return (
    <span className="jp-DCR-digest">
      <code title={value}>{shortDigest(value, 16)}</code>
      {value && (
        <button
          className="jp-DCR-icon-button"
          data-testid="dcr-copy"
          aria-label={`Copy ${props.label}`}
          title={`Copy ${props.label}: ${value}`}
          onClick={() => Clipboard.copyToSystem(value)}
        >
          <copyIcon.react tag="span" />
        </button>
      )}
    </span>
  );
}

function claim(claims: { [key: string]: unknown }, ...names: string[]): string | null {
  for (const name of names) {
    const value = claims[name];
    if (typeof value === 'string' && value) {
      return value;
    }
  }
  return null;
}

function ReceiptDetails(props: {
  receipt: IReceipt;
  job: IJob | null;
  outputs: IOutputFile[] | null;
  client: DCRClient;
}): JSX.Element {
  const m = props.receipt.manifest;
  const claims = m.grant.claims ?? {};
  const user = claim(claims, 'user', 'sub');
  const grantId = claim(claims, 'jti');
  const download = async (path: string): Promise<void> => {
    try {
      saveBlob(await props.client.outputFile(m.job_id, path), baseName(path));
    } catch (error) {
      await showErrorMessage('Download failed', errorMessage(error));
    }
  };
  const available = new Set((props.outputs ?? []).map(f => f.path));
  return (
    <>
      <section className="jp-DCR-section" aria-label="What ran">
        <h2>What ran</h2>
        <dl className="jp-DCR-facts">
          <dt>Notebook</dt>
          <dd>
            <code>{m.notebook}</code>
          </dd>
          {props.job && <dt>State</dt>}
          {props.job && <dd>{stateLabel(props.job.state)}</dd>}
          <dt>Started</dt>
          <dd>{m.started_at}</dd>
          <dt>Finished</dt>
          <dd>{m.finished_at}</dd>
          <dt>Release</dt>
          <dd>
            {m.release.decision} ({m.release.mode === 'review' ? 'after the provider’s review' : 'automatic'})
          </dd>
          <dt>Output check</dt>
          <dd>{m.output_check.passed ? 'passed' : `failed: ${m.output_check.violations.join('; ')}`}</dd>
          <dt>Enclave</dt>
          <dd data-testid="dcr-enclave-kind">
            {m.enclave.kind === 'local' ? 'local (simulated)' : m.enclave.kind}
          </dd>
          <dt>Enclave image</dt>
          <dd>
            <Digest value={m.enclave.image_digest} label="enclave image digest" />
          </dd>
          <dt>Bundle</dt>
          <dd>
            <Digest value={m.bundle_digest} label="bundle digest" />
          </dd>
          <dt>Grant</dt>
          <dd>
            <Digest value={m.grant.digest} label="grant digest" />
            {(user || grantId) && (
              <span className="jp-DCR-note">
                {user && ` for ${user}`}
                {grantId && ` (${grantId})`}
              </span>
            )}
          </dd>
          <dt>Hub key</dt>
          <dd>
            <Digest value={m.hub_key_thumbprint} label="hub key thumbprint" />
          </dd>
          <dt>Output policy</dt>
          <dd>
            <Digest value={m.policies.output_policy} label="output policy digest" />
          </dd>
        </dl>
      </section>
      <section className="jp-DCR-section" aria-label="Datasets">
        <h2>Datasets</h2>
        <table className="jp-DCR-table" data-testid="dcr-receipt-datasets">
          <thead>
            <tr>
              <th scope="col">Dataset</th>
              <th scope="col">Version</th>
              <th scope="col">Encrypted files</th>
              <th scope="col">Release condition</th>
            </tr>
          </thead>
          <tbody>
            {m.datasets.map(d => (
              <tr key={`${d.provider}/${d.dataset}`}>
                <td>
                  {d.provider}/{d.dataset}
                </td>
                <td>
                  <Digest value={d.version} label={`version of ${d.provider}/${d.dataset}`} />
                </td>
                <td>
                  {d.files.map(f => (
                    <div key={f.name}>
                      {f.name} <Digest value={f.ciphertext_sha256} label={`ciphertext digest of ${f.name}`} />
                    </div>
                  ))}
                </td>
                <td>
                  <Digest
                    value={m.policies.conditions[`${d.provider}/${d.dataset}`]}
                    label={`key-release condition of ${d.provider}/${d.dataset}`}
                  />
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
      <section className="jp-DCR-section" aria-label="Outputs">
        <h2>Outputs</h2>
        <table className="jp-DCR-table" data-testid="dcr-receipt-outputs">
          <thead>
            <tr>
              <th scope="col">File</th>
              <th scope="col">Size</th>
              <th scope="col">sha256</th>
              <th scope="col">
                <span className="jp-DCR-visually-hidden">Download</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {m.outputs.map(o => (
              <tr key={o.path}>
                <td>
                  <code>{o.path}</code>
                </td>
                <td>{formatBytes(o.size)}</td>
                <td>
                  <Digest value={o.sha256} label={`sha256 of ${o.path}`} />
                </td>
                <td>
                  {available.has(o.path) && (
                    <button
                      className="jp-DCR-icon-button"
                      data-testid="dcr-download-output"
                      aria-label={`Download ${o.path}`}
                      title={`Download ${o.path}`}
                      onClick={() => void download(o.path)}
                    >
                      <downloadIcon.react tag="span" />
                    </button>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </section>
    </>
  );
}

function Downloads(props: { job: IJob; client: DCRClient }): JSX.Element {
  const base = props.job.outputs_path as string;
  const get = async (name: string): Promise<void> => {
    try {
      saveBlob(await props.client.rootFile(`${base}/${name}`), `${props.job.id}-${name}`);
    } catch (error) {
      await showErrorMessage('Download failed', errorMessage(error));
    }
  };
  return (
    <section className="jp-DCR-section" aria-label="Share this receipt">
      <h2>Share this receipt</h2>
      <p className="jp-DCR-note">
        The receipt is public and holds no data. Anyone can check it offline with the enclave signer’s key:
        put the three files in a folder as <code>receipt.json</code>, <code>attestation.jwt</code> and{' '}
        <code>signer-jwks.json</code>, the outputs under <code>outputs/</code>, and run{' '}
        <code>dcr verify FOLDER --trust SIGNER_JWKS</code>. The same layout is in your files at{' '}
        <code>{base}/</code>.
      </p>
      <div className="jp-DCR-job-actions" data-testid="dcr-receipt-download">
        {RECEIPT_FILES.map(name => (
          <Button
            key={name}
            small
            aria-label={`Download ${name}`}
            data-testid={`dcr-download-${name}`}
            onClick={() => void get(name)}
          >
            <downloadIcon.react tag="span" /> {name}
          </Button>
        ))}
      </div>
    </section>
  );
}

/** A main-area tab showing one job's receipt. */
export function createReceiptWidget(jobId: string, client: DCRClient): MainAreaWidget<ReceiptView> {
  const content = new ReceiptView(jobId, client);
  const widget = new MainAreaWidget({ content });
  widget.id = `dcr-receipt-${jobId}`;
  widget.title.label = `Receipt ${jobId.slice(0, 12)}…`;
  widget.title.caption = `Receipt of ${jobId}`;
  widget.title.icon = enclaveIcon;
  widget.title.closable = true;
  return widget;
}
