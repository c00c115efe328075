/**
 * The REST client (src/api.ts): every request goes through JupyterLab's `ServerConnection.makeRequest`
 * (replaced here by a stub answering like the server), and a refusal is thrown with the server's own words.
 */

import { ServerConnection } from '@jupyterlab/services';

import { DCRClient, DCRRequestError, errorMessage } from '../src/api';

const BASE = 'http://127.0.0.1:8888/user/alice/';
const settings = ServerConnection.makeSettings({ baseUrl: BASE });

function answer(status: number, body: string, statusText = '', type = 'application/json'): Response {
  return new Response(body, { status, statusText, headers: { 'Content-Type': type } });
}

let makeRequest: jest.SpiedFunction<typeof ServerConnection.makeRequest>;

beforeEach(() => {
  makeRequest = jest.spyOn(ServerConnection, 'makeRequest');
});

afterEach(() => {
  makeRequest.mockRestore();
});

async function refusal(promise: Promise<unknown>): Promise<DCRRequestError> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(DCRRequestError);
    return error as DCRRequestError;
  }
  throw new Error('the request was not refused');
}

describe('the REST client', () => {
  it('shows a 4xx refusal exactly as the server wrote it in {"error": ...}', async () => {
    const message =
      'the workspace of analysis.ipynb is 12.0 MiB, over the limit of 10.0 MiB; move large files out of its folder';
    makeRequest.mockResolvedValue(answer(413, JSON.stringify({ error: message }), 'Payload Too Large'));
    const client = new DCRClient(settings);

    const error = await refusal(client.submit('work/analysis.ipynb'));
    expect(error.message).toBe(message);
    expect(error.status).toBe(413);
    expect(errorMessage(error)).toBe(message);

    expect(makeRequest).toHaveBeenCalledTimes(1);
    const [url, init, used] = makeRequest.mock.calls[0];
    expect(url).toBe(`${BASE}dcr/api/jobs`);
    expect(init).toMatchObject({ method: 'POST', headers: { 'Content-Type': 'application/json' } });
    expect(JSON.parse(init.body as string)).toEqual({ path: 'work/analysis.ipynb' });
    expect(used).toBe(settings);
  });

  it('a refusal of the dataset listing and of a cancel carry their status and message', async () => {
    makeRequest.mockResolvedValueOnce(answer(503, JSON.stringify({ error: 'the hub cannot be reached' })));
    makeRequest.mockResolvedValueOnce(
      answer(409, JSON.stringify({ error: 'job-0123 has ended (succeeded); there is nothing to cancel' }))
    );
    const client = new DCRClient(settings);
    const datasets = await refusal(client.datasets());
    expect([datasets.status, datasets.message]).toEqual([503, 'the hub cannot be reached']);
    const cancel = await refusal(client.cancel('job-0123456789abcdef01234567'));
    expect([cancel.status, cancel.message]).toEqual([
      409,
      'job-0123 has ended (succeeded); there is nothing to cancel'
    ]);
    expect(makeRequest.mock.calls[1][0]).toBe(`${BASE}dcr/api/jobs/job-0123456789abcdef01234567/cancel`);
  });

  it('jupyter_server\'s own JSON errors ({"message": ...}) are shown as written too', async () => {
    makeRequest.mockResolvedValue(
      answer(403, JSON.stringify({ message: "'_xsrf' argument missing from POST" }))
    );
    const error = await refusal(new DCRClient(settings).preview('a.ipynb'));
    expect([error.status, error.message]).toEqual([403, "'_xsrf' argument missing from POST"]);
    expect(makeRequest.mock.calls[0][0]).toBe(`${BASE}dcr/api/jobs?dry_run=1`);
  });

  it('an answer without a JSON message (a proxy page) gives the status line', async () => {
    makeRequest.mockResolvedValue(answer(502, '<html>Bad Gateway</html>', 'Bad Gateway', 'text/html'));
    const error = await refusal(new DCRClient(settings).getJob('job-0123456789abcdef01234567'));
    expect([error.status, error.message]).toEqual([502, 'HTTP 502 Bad Gateway']);
  });

  it('a server that cannot be reached is said so, with status 0', async () => {
    makeRequest.mockRejectedValue(new TypeError('fetch failed'));
    const error = await refusal(new DCRClient(settings).listJobs());
    expect([error.status, error.message]).toEqual([0, 'the server cannot be reached: fetch failed']);
  });

  it('a page of the job list is asked for by offset and limit, and its JSON returned', async () => {
    const page = { jobs: [], total: 450, offset: 195, limit: 200 };
    makeRequest.mockResolvedValue(answer(200, JSON.stringify(page)));
    expect(await new DCRClient(settings).listJobs(195, 200)).toEqual(page);
    expect(makeRequest.mock.calls[0][0]).toBe(`${BASE}dcr/api/jobs?offset=195&limit=200`);
    expect(makeRequest.mock.calls[0][1].method).toBeUndefined(); // a GET
  });
});
