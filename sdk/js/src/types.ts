/** Options of `load(writeKey, dataPlaneUrl, options)`. Every field is optional. */
export interface LoadOptions {
  /** Bytes the on-device queue (and its dead letters) may hold; a new event that does not fit is refused. Default 20 MiB. */
  maxQueueBytes?: number;
  /** Events per `/v1/batch` request. Default 100. */
  maxBatchEvents?: number;
  /** Bytes per `/v1/batch` request (the first event is sent alone when larger). Default 512 KiB. */
  maxBatchBytes?: number;
  /** First retry delay ceiling in ms (full jitter: a random delay up to it). Default 1000. */
  retryBaseMs?: number;
  /** Cap of the backoff in ms. Default 300000 (5 min). */
  retryCapMs?: number;
  /** Cap of an honoured `Retry-After` in ms. Default 300000 (5 min). */
  retryAfterCapMs?: number;
  /** A request without an answer after this many ms counts as a network error. Default 30000. */
  requestTimeoutMs?: number;
  /** Bytes of the page-hide `keepalive` request (the browser's budget is 64 KiB for all of a page's). Default 60000. */
  keepaliveBytes?: number;
  /** The sender looks at the queue at least this often when idle, in ms. Default 10000. */
  pollMs?: number;
  /** Where the queue lives: IndexedDB unless unavailable (`auto`), or a forced fallback. Default `auto`. */
  storage?: "auto" | "localStorage" | "memory";
  /** Called for every event refused, dead-lettered or not stored, and for storage fallbacks. */
  onError?: (error: BallastError) => void;
  /** Called once loaded (as `ready`). */
  onLoaded?: () => void;
}

/** What went wrong: `queue_full` (refused, nothing evicted), `refused` (the server refused the event
 * for good: 400/413; it is in the dead-letter store), `storage` (the queue could not be written, or
 * fell back from IndexedDB), `not_loaded`. */
export type ErrorCode = "queue_full" | "refused" | "storage" | "not_loaded";

export interface BallastError extends Error {
  code: ErrorCode;
  /** The event concerned, when there is one. */
  event?: ApiObject;
  /** The HTTP status that refused it (`refused`). */
  status?: number;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type ApiObject = Record<string, any>;

/** Options of a call (as analytics-js's `apiOptions`). */
export interface ApiOptions {
  integrations?: ApiObject;
  context?: ApiObject;
  anonymousId?: string;
  originalTimestamp?: string;
  [key: string]: unknown;
}

/** One event the server refused for good, kept on the device. */
export interface DeadLetter {
  event: ApiObject;
  status: number;
  reason: string;
  at: string;
}

/** Counters since the page loaded. */
export interface Stats {
  /** Events stored in the queue by this page. */
  queued: number;
  /** New events refused because the queue was full. */
  refused: number;
  /** Events this page delivered (readable 2xx). */
  sent: number;
  /** Events this page moved to the dead-letter store. */
  deadLettered: number;
  /** Requests that failed and will be retried. */
  retries: number;
  /** Where the queue lives. */
  storage: "indexeddb" | "localStorage" | "memory" | "none";
  /** Whether this page holds the sender lock. */
  sender: boolean;
}
