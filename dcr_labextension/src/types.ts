/**
 * The JSON the DCR server extension speaks (dcr_server_ext/openapi.yaml, schemas/job.schema.json and
 * events/job.json), as TypeScript types. No code: shared by the API client, the state model and the views.
 */

/** Lifecycle states, in lifecycle order (dcr_enclave.contract.JOB_STATES). */
export type JobState =
  | 'submitted'
  | 'granted'
  | 'launching'
  | 'running'
  | 'checking'
  | 'succeeded'
  | 'held'
  | 'released'
  | 'rejected'
  | 'failed'
  | 'cancelled';

/** One dataset a job asked for; version and release come from the grant (null before it). */
export interface IJobDataset {
  provider: string;
  dataset: string;
  version?: string | null;
  release?: 'auto' | 'review' | null;
}

/**
 * Where a held job's outputs are in the hub's airlock (the job's `review`): `unsent` not yet delivered to
 * the airlock (or there is none: a development setup, see `note`), `waiting` for the reviewers, then their
 * decision. Null for a job that was never held.
 */
export type ReviewStatus = 'unsent' | 'waiting' | 'released' | 'rejected';

export interface IJobReview {
  status: ReviewStatus;
  /** The display name of each provider whose reviewers must decide. */
  reviewers: string[];
  /** 1, or 2 under the two-person rule. */
  required_approvals: number;
  /** Approvals so far. */
  approvals: number;
  /** The reviewers' comment once decided (always for a rejection, for a release if they wrote one). */
  comment: string | null;
  /** When they decided (ISO time). */
  decided_at: string | null;
  /** Why the review is where it is, e.g. why it is unsent. */
  note: string | null;
}

/** A job as `GET /dcr/api/jobs/<id>` answers it (Job.to_api()). */
export interface IJob {
  id: string;
  notebook: string;
  state: JobState;
  created: string;
  updated: string;
  bundle: { digest: string; files: number; bytes: number };
  datasets: IJobDataset[];
  progress: { cell: number | null; cells: number } | null;
  /** Why a failed (or rejected) job did not succeed; never data. */
  failure: {
    reason: string;
    cell?: number | null;
    ename?: string | null;
    /** The run's full failure, once the provider's reviewers released it. */
    detail?: { evalue: string; traceback: string };
  } | null;
  /** The airlock review of a held job and its outcome; null for a job that was never held. */
  review: IJobReview | null;
  outputs_path: string | null;
  receipt: boolean;
  enclave: { kind: string; simulated: boolean; image_digest?: string | null } | null;
  backend: string;
}

/** `GET /dcr/api/jobs`. */
export interface IJobList {
  jobs: IJob[];
  total: number;
  offset: number;
  limit: number;
}

/** A job event on the Jupyter Server event bus (schema events/job.json); never data. */
export interface IJobEvent {
  job_id: string;
  state: JobState;
  cell: number | null;
  cells: number | null;
  reason: string | null;
}

/** `GET /dcr/api/jobs/<id>/outputs`. */
export interface IOutputFile {
  path: string;
  size: number;
  sha256: string;
  content_type: string;
}

/** `POST /dcr/api/jobs?dry_run=1`: what a submission would bundle and ask for. */
export interface ISubmitPreview {
  notebook: string;
  bundle: { digest: string; files: number; bytes: number };
  files: { path: string; size: number }[];
  datasets: string[];
  datasets_from: 'request' | 'references' | 'entitled';
  /** What the hub's dry run says it would grant; null when the grant source cannot answer dry runs. */
  grant?: { datasets: IJobDataset[] } | null;
}

/** One file of a dataset as the sandbox and the enclave both see it. */
export interface IDatasetFile {
  name: string;
  path: string;
  synthetic_size: number | null;
}

/** `GET /dcr/api/datasets` entries. */
export interface IDataset {
  provider: string;
  dataset: string;
  version: string | null;
  release: 'auto' | 'review' | null;
  protection: 'dp' | 'random' | 'provider-file' | null;
  mechanism: string | null;
  epsilon: number | null;
  delta: number | null;
  description: string;
  files: IDatasetFile[];
  fidelity_report: string | null;
}

/** One check of `dcr verify`. */
export interface ICheck {
  name: string;
  passed: boolean;
  detail: string;
}

/** `GET /dcr/api/jobs/<id>/verify`. */
export interface IVerification {
  job_id: string;
  verified: boolean;
  checks: ICheck[];
  simulated: boolean;
  enclave: { kind: string; image_digest: string | null };
  anchors: { kind: 'key' | 'thumbprint' | 'root'; source: string; id: string }[];
  /** The enclave image digests the receipt had to come from (the deployment's pins). */
  enclave_digests: string[];
  note: string | null;
  checked_at: string;
}

/** The receipt manifest (dcr/receipt/v1); only the fields the viewer shows are typed. */
export interface IReceiptManifest {
  schema: string;
  job_id: string;
  notebook: string;
  bundle_digest: string;
  enclave: { kind: string; image_digest: string };
  hub_key_thumbprint: string;
  grant: { digest: string; claims: { [key: string]: unknown } };
  datasets: {
    provider: string;
    dataset: string;
    version: string;
    files: { name: string; ciphertext_sha256: string }[];
  }[];
  policies: { output_policy: string; conditions: { [dataset: string]: string } };
  outputs: { path: string; size: number; sha256: string }[];
  output_check: { passed: boolean; violations: string[] };
  release: { mode: string; decision: string };
  started_at: string;
  finished_at: string;
}

/** `GET /dcr/api/jobs/<id>/receipt`. */
export interface IReceipt {
  manifest: IReceiptManifest;
  token: string;
  signer_jwks: { keys: { [key: string]: unknown }[] };
}
