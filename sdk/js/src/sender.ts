// The sender: one per origin and write key (the page holding a Web Lock), sending the queue's
// head in order, one batch in flight; a batch that fails is tried again, in place, at the head.
// Rows leave the queue only after a readable 2xx.

import type { Backend, Item } from "./store";

export interface SenderOptions {
  maxBatchEvents: number;
  maxBatchBytes: number;
  retryBaseMs: number;
  retryCapMs: number;
  retryAfterCapMs: number;
  requestTimeoutMs: number;
  keepaliveBytes: number;
  pollMs: number;
}

export interface SenderHooks {
  url: string;
  headers: Record<string, string>;
  /** The Web Lock's name; none: this page sends its own (memory) queue without one. */
  lock: string | null;
  backend: Backend;
  sent(n: number): void;
  dead(item: Item, status: number, reason: string): void;
  retry(): void;
  storageError(e: unknown): void;
}

interface Answer {
  ok: boolean;
  status: number;
  retryAfter: number;
  reason: string;
}

/** `Retry-After` in ms (seconds or an HTTP date); 0 when absent or unreadable. */
export function retryAfterMs(v: string | null, now = Date.now()): number {
  if (!v) return 0;
  const s = Number(v.trim());
  if (Number.isFinite(s)) return Math.max(0, s * 1000);
  const t = Date.parse(v);
  return Number.isFinite(t) ? Math.max(0, t - now) : 0;
}

/** Exponential backoff with full jitter (a random delay up to base·2^(attempt-1), capped);
 * an answer's `Retry-After` (capped) is a floor. */
export function backoffMs(o: SenderOptions, attempt: number, retryAfter: number, rnd = Math.random()): number {
  const ceiling = Math.min(o.retryCapMs, o.retryBaseMs * 2 ** Math.min(attempt - 1, 40));
  const d = rnd * ceiling;
  return retryAfter > 0 ? Math.max(d, Math.min(retryAfter, o.retryAfterCapMs)) : d;
}

/** `{"batch":[…],"sentAt":…}` from the stored JSON texts, each given its `sentAt`. */
export function batchBody(items: Item[], now: string): string {
  const at = JSON.stringify(now);
  return `{"batch":[${items.map((i) => `${i.b.slice(0, -1)},"sentAt":${at}}`).join(",")}],"sentAt":${at}}`;
}

export class Sender {
  /** This page holds the lock and runs the loop. */
  holding = false;
  private gen = 0;
  private release?: () => void;
  private lockAbort?: AbortController;
  private inflight?: AbortController;
  private wake?: () => void;
  private dirty = false;
  /** The head as last read (what a page-hide sends with `keepalive`). */
  private head: Item[] = [];
  private lastKeepalive = -1;

  constructor(
    private o: SenderOptions,
    private h: SenderHooks,
  ) {}

  /** Asks for the lock (queued behind the current sender, if any). */
  start() {
    if (this.holding || this.lockAbort) return;
    const locks = typeof navigator !== "undefined" ? navigator.locks : undefined;
    if (!this.h.lock || !locks) {
      void this.hold();
      return;
    }
    const ac = (this.lockAbort = new AbortController());
    locks.request(this.h.lock, { signal: ac.signal }, () => this.hold()).catch(() => undefined);
  }

  /** Page hide: lets the lock go (so the page can enter the back/forward cache) and stops the loop. */
  stop() {
    this.lockAbort?.abort();
    this.lockAbort = undefined;
    if (!this.holding) return;
    this.holding = false;
    this.gen++;
    this.release?.();
    this.release = undefined;
    this.inflight?.abort();
    this.kick();
  }

  /** New events in the queue (this page's or another tab's). */
  nudge() {
    this.dirty = true;
    this.kick();
  }

  /** Sends the head with `fetch(…, {keepalive: true})`, under the budget; the rows stay queued until
   * a later readable 2xx. On `visibilitychange` only when no request is out (it would be a copy). */
  keepalive(pageHide: boolean) {
    if (!this.holding || !this.head.length || (!pageHide && this.inflight)) return;
    if (this.head[0].k === this.lastKeepalive) return;
    const items: Item[] = [];
    let size = 64;
    for (const it of this.head) {
      size += it.n + 48;
      if (size > this.o.keepaliveBytes) break;
      items.push(it);
    }
    if (!items.length) return;
    this.lastKeepalive = items[0].k;
    try {
      fetch(this.h.url, {
        method: "POST",
        keepalive: true,
        headers: this.h.headers,
        body: batchBody(items, new Date().toISOString()),
      }).catch(() => undefined);
    } catch {
      // Over the browser's keepalive budget: the rows are still queued.
    }
  }

  private hold(): Promise<void> {
    this.holding = true;
    const gen = ++this.gen;
    return new Promise<void>((res) => {
      this.release = res;
      void this.loop(gen);
    });
  }

  private kick() {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Waits `ms`; an idle wait also ends on a nudge or a stop. */
  private sleep(ms: number, idle: boolean): Promise<void> {
    return new Promise((res) => {
      const w = () => {
        clearTimeout(t);
        res();
      };
      const t = setTimeout(() => {
        if (this.wake === w) this.wake = undefined;
        res();
      }, ms);
      if (idle) this.wake = w;
    });
  }

  private async loop(gen: number) {
    const o = this.o;
    const h = this.h;
    let attempt = 0;
    // After a 400/413 the batch is halved until the refused event is alone; the smaller size
    // holds until the head is past the batch that failed.
    let limit = o.maxBatchEvents;
    let until = -1;
    while (gen === this.gen) {
      this.dirty = false;
      let items: Item[];
      try {
        items = await h.backend.head(limit, o.maxBatchBytes);
      } catch (e) {
        h.storageError(e);
        await this.sleep(backoffMs(o, ++attempt, 0), false);
        continue;
      }
      if (gen !== this.gen) break;
      this.head = items;
      if (!items.length) {
        if (!this.dirty) await this.sleep(o.pollMs, true);
        continue;
      }
      const last = items[items.length - 1].k;
      const r = await this.post(items);
      if (r.ok) {
        this.head = [];
        try {
          await h.backend.remove(items.map((i) => i.k));
          h.sent(items.length);
        } catch (e) {
          h.storageError(e);
        }
        attempt = 0;
        if (last >= until) limit = o.maxBatchEvents;
        continue;
      }
      if (gen !== this.gen) break;
      if (r.status === 400 || r.status === 413) {
        attempt = 0;
        if (items.length > 1) {
          limit = Math.ceil(items.length / 2);
          until = Math.max(until, last);
          continue;
        }
        try {
          await h.backend.dead(items[0], r.status, r.reason);
          this.head = [];
          h.dead(items[0], r.status, r.reason);
        } catch (e) {
          h.storageError(e);
          await this.sleep(backoffMs(o, 1, 0), false);
        }
        if (last >= until) limit = o.maxBatchEvents;
        continue;
      }
      // 408, 429, 5xx, network (and any other answer: nothing is dropped without a definitive refusal).
      h.retry();
      await this.sleep(backoffMs(o, ++attempt, r.retryAfter), false);
    }
  }

  private async post(items: Item[]): Promise<Answer> {
    const ac = new AbortController();
    this.inflight = ac;
    const t = setTimeout(() => ac.abort(), this.o.requestTimeoutMs);
    try {
      const res = await fetch(this.h.url, {
        method: "POST",
        headers: this.h.headers,
        body: batchBody(items, new Date().toISOString()),
        signal: ac.signal,
      });
      // A 2xx counts only once its body has been read to the end.
      const text = await res.text();
      return {
        ok: res.status >= 200 && res.status < 300,
        status: res.status,
        retryAfter: retryAfterMs(res.headers.get("Retry-After")),
        reason: text.slice(0, 200),
      };
    } catch {
      return { ok: false, status: 0, retryAfter: 0, reason: "network error" };
    } finally {
      clearTimeout(t);
      if (this.inflight === ac) this.inflight = undefined;
    }
  }
}
