/**
 * Small, pure formatting helpers shared by the views (sizes, digests, dataset protection, links).
 * Nothing here touches the DOM or JupyterLab: jest tests it under Node.
 */

import { IDataset, IJob, JobState } from './types';

/** "812 B", "1.2 KiB", "3.4 MiB". */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) {
    return '–';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** "sha256:0123456789ab…" for display; the full digest goes into titles and copy buttons. */
export function shortDigest(digest: string | null | undefined, hexChars = 12): string {
  if (!digest) {
    return '–';
  }
  const [algo, hex] = digest.includes(':') ? digest.split(':', 2) : ['', digest];
  if (hex.length <= hexChars) {
    return digest;
  }
  return `${algo ? algo + ':' : ''}${hex.slice(0, hexChars)}…`;
}

/** What protects the real data in the synthetic version a researcher sees. */
export function protectionLabel(d: Pick<IDataset, 'protection' | 'epsilon' | 'delta' | 'mechanism'>): string {
  switch (d.protection) {
    case 'dp': {
      const parts = [];
      if (d.epsilon !== null) {
        parts.push(`ε = ${formatNumber(d.epsilon)}`);
      }
      if (d.delta !== null && d.delta > 0) {
        parts.push(`δ = ${formatNumber(d.delta)}`);
      }
      if (d.mechanism) {
        parts.push(d.mechanism.toUpperCase());
      }
      return parts.length ? `Differentially private (${parts.join(', ')})` : 'Differentially private';
    }
    case 'random':
      return 'Random (drawn from the schema only)';
    case 'provider-file':
      return "Provider's own file";
    default:
      return 'Unknown';
  }
}

function formatNumber(value: number): string {
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e6)) {
    return value.toExponential(0);
  }
  return String(Number(value.toPrecision(4)));
}

/**
 * A link the UI may render: http(s) or a path on this origin. Anything else (javascript:, data:) is
 * refused; the server already filters, this keeps the browser safe on its own.
 */
export function safeLink(url: string | null | undefined): string | null {
  if (!url) {
    return null;
  }
  return /^(https?:\/\/|\/(?!\/))[^\s<>"']+$/.test(url) ? url : null;
}

/** The state as people read it. */
export function stateLabel(state: JobState): string {
  switch (state) {
    case 'held':
      return 'held for review';
    case 'released':
      return 'released after review';
    case 'rejected':
      return 'rejected in review';
    default:
      return state;
  }
}

/** The file name of a `/`-separated path. */
export function baseName(path: string): string {
  const parts = path.split('/');
  return parts[parts.length - 1] || path;
}

/**
 * Why a job failed, as people read it: the reason, the failing code cell (1-based, counting code
 * cells only) and the exception class, e.g. "error in code cell 2 (ZeroDivisionError)". Never data: the server
 * sends only these three fields.
 */
export function failureText(reason: string | null, failure: IJob['failure'] | undefined): string | null {
  const text = failure?.reason || reason;
  if (!text) {
    return null;
  }
  const where = typeof failure?.cell === 'number' ? ` in code cell ${failure.cell + 1}` : '';
  const what = failure?.ename ? ` (${failure.ename})` : '';
  return `${text}${where}${what}`;
}
