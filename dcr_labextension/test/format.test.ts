/**
 * The views' formatting helpers (src/format.ts): sizes, digests, dataset protection and safe links.
 */

import {
  baseName,
  failureText,
  formatBytes,
  protectionLabel,
  safeLink,
  shortDigest,
  stateLabel
} from '../src/format';

describe('formatting', () => {
  it('sizes in binary units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1023)).toBe('1023 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(250 * 1024 * 1024)).toBe('250 MiB');
    expect(formatBytes(-1)).toBe('–');
  });

  it('digests shortened for display, whole when short or missing', () => {
    const d = 'sha256:' + '0123456789abcdef'.repeat(4);
    expect(shortDigest(d)).toBe('sha256:0123456789ab…');
    expect(shortDigest('sha256:abc')).toBe('sha256:abc');
    expect(shortDigest(null)).toBe('–');
  });

  it('protection: DP with ε, δ and mechanism; random; provider file', () => {
    expect(protectionLabel({ protection: 'dp', epsilon: 1.5, delta: 1e-6, mechanism: 'mst' })).toBe(
      'Differentially private (ε = 1.5, δ = 1e-6, MST)'
    );
    expect(protectionLabel({ protection: 'dp', epsilon: 2, delta: 0, mechanism: null })).toBe(
      'Differentially private (ε = 2)'
    );
    expect(protectionLabel({ protection: 'random', epsilon: null, delta: null, mechanism: null })).toContain(
      'Random'
    );
    expect(
      protectionLabel({ protection: 'provider-file', epsilon: null, delta: null, mechanism: null })
    ).toBe("Provider's own file");
    expect(protectionLabel({ protection: null, epsilon: null, delta: null, mechanism: null })).toBe(
      'Unknown'
    );
  });

  it('links: http(s) and same-origin paths only', () => {
    expect(safeLink('https://hub.example.org/reports/acme.html')).toBe(
      'https://hub.example.org/reports/acme.html'
    );
    expect(safeLink('/hub/dcr/reports/acme')).toBe('/hub/dcr/reports/acme');
    for (const bad of ['javascript:alert(1)', 'data:text/html,x', '//evil.example', 'ftp://x', '', null]) {
      expect(safeLink(bad)).toBeNull();
    }
  });

  it('states and names', () => {
    expect(stateLabel('held')).toBe('held for review');
    expect(stateLabel('released')).toBe('released after review');
    expect(stateLabel('rejected')).toBe('rejected in review');
    expect(stateLabel('running')).toBe('running');
    expect(baseName('work/sub/analysis.ipynb')).toBe('analysis.ipynb');
    expect(baseName('analysis.ipynb')).toBe('analysis.ipynb');
  });

  it('failures: reason, 1-based cell and exception class, or the event reason alone', () => {
    expect(failureText(null, { reason: 'error', cell: 1, ename: 'ZeroDivisionError' })).toBe(
      'error in code cell 2 (ZeroDivisionError)'
    );
    expect(failureText('the enclave vanished', null)).toBe('the enclave vanished');
    expect(failureText('from the event', { reason: 'grant refused', cell: null, ename: null })).toBe(
      'grant refused'
    );
    expect(failureText(null, null)).toBeNull();
  });
});
