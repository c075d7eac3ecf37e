// The API (analytics-js's common calls). Every call resolves once its event is durably on the
// device: the page's calls of one moment share one strict IndexedDB transaction.

import { context, Identity, pageProps, uuid, type Field } from "./identity";
import { Sender, type SenderOptions } from "./sender";
import { openIdb, Simple, type Backend, type Item } from "./store";
import type { ApiObject, ApiOptions, BallastError, DeadLetter, ErrorCode, LoadOptions, Stats } from "./types";

type Opts = SenderOptions & {
  maxQueueBytes: number;
  storage: "auto" | "localStorage" | "memory";
  onError?: (e: BallastError) => void;
  onLoaded?: () => void;
};

const DEFAULTS: Opts = {
  maxQueueBytes: 20 * 1024 * 1024,
  maxBatchEvents: 100,
  maxBatchBytes: 512 * 1024,
  retryBaseMs: 1000,
  retryCapMs: 300_000,
  retryAfterCapMs: 300_000,
  requestTimeoutMs: 30_000,
  keepaliveBytes: 60_000,
  pollMs: 10_000,
  storage: "auto",
};

type Callback = (...a: unknown[]) => void;

interface Pending {
  b: string;
  n: number;
  ev: ApiObject;
  res: () => void;
  rej: (e: BallastError) => void;
}

const utf8 = new TextEncoder();

/** Splits off a trailing callback (analytics-js accepts one as the last argument). */
function cb(args: unknown[]): [unknown[], Callback | undefined] {
  const last = args[args.length - 1];
  return typeof last === "function" ? [args.slice(0, -1), last as Callback] : [args, undefined];
}

const obj = (v: unknown): ApiObject | undefined => (v && typeof v === "object" ? (v as ApiObject) : undefined);

export class Ballast {
  private o: Opts = DEFAULTS;
  private started = false;
  private isLoaded = false;
  private readonly loaded: Promise<void>;
  private markLoaded!: () => void;
  private readyCbs: Callback[] = [];
  private backend?: Backend;
  private sender?: Sender;
  private bc?: BroadcastChannel;
  private ident?: Identity;
  private pend: Pending[] = [];
  private scheduled = false;
  private chain: Promise<void> = Promise.resolve();
  private st = { queued: 0, refused: 0, sent: 0, deadLettered: 0, retries: 0 };

  constructor() {
    this.loaded = new Promise((res) => (this.markLoaded = res));
  }

  /** Opens the queue and starts (or queues for) the sender. Calls made before it are kept, in order. */
  load(writeKey: string, dataPlaneUrl: string, options: LoadOptions = {}): Promise<void> {
    if (this.started) return this.loaded;
    this.started = true;
    this.o = { ...DEFAULTS, ...options } as Opts;
    void this.init(writeKey, dataPlaneUrl.replace(/\/+$/, "") + "/v1/batch");
    return this.loaded;
  }

  private async init(writeKey: string, url: string) {
    const name = "ballast:" + writeKey;
    this.id().anonymousId();
    const backend = (this.backend = await this.open(name));
    const sender = (this.sender = new Sender(this.o, {
      url,
      headers: {
        "Content-Type": "application/json;charset=UTF-8",
        Authorization: "Basic " + btoa(writeKey + ":"),
      },
      lock: backend.kind === "memory" ? null : name,
      backend,
      sent: (n) => (this.st.sent += n),
      dead: (item: Item, status: number, reason: string) => {
        this.st.deadLettered++;
        this.err(
          "refused",
          `the server refused an event for good (${status} ${reason}); it is in the dead-letter store`,
          JSON.parse(item.b),
          status,
        );
      },
      retry: () => this.st.retries++,
      storageError: (e) => this.err("storage", "the queue could not be read or written: " + String(e)),
    }));
    try {
      this.bc = new BroadcastChannel(name);
      this.bc.onmessage = () => sender.nudge();
    } catch {
      // No BroadcastChannel: the sender still looks at the queue every `pollMs`.
    }
    addEventListener("pagehide", () => {
      sender.keepalive(true);
      sender.stop();
    });
    addEventListener("pageshow", (e) => {
      if (e.persisted) sender.start();
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "hidden") sender.keepalive(false);
    });
    sender.start();
    this.isLoaded = true;
    this.markLoaded();
    for (const f of [this.o.onLoaded, ...this.readyCbs.splice(0)]) this.safe(f);
  }

  private async open(name: string): Promise<Backend> {
    const o = this.o;
    if (o.storage === "auto") {
      try {
        if (typeof indexedDB === "undefined") throw new Error("no indexedDB");
        return await openIdb(name);
      } catch (e) {
        this.err("storage", `IndexedDB is unavailable (${String(e)}): the queue falls back to localStorage`);
      }
    }
    let key: string | null = o.storage === "memory" ? null : name + ":queue";
    if (key) {
      try {
        localStorage.setItem(key + ":probe", "1");
        localStorage.removeItem(key + ":probe");
      } catch (e) {
        this.err("storage", `localStorage is unavailable (${String(e)}): the queue is in memory only`);
        key = null;
      }
    }
    return new Simple(key, (e) =>
      this.err("storage", `localStorage refused a write (${String(e)}): the queue is in memory only`),
    );
  }

  private id(): Identity {
    return (this.ident ??= new Identity());
  }

  private safe(f?: Callback, ...a: unknown[]) {
    try {
      f?.(...a);
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  }

  private err(code: ErrorCode, message: string, event?: ApiObject, status?: number): BallastError {
    const e = new Error("ballast: " + message) as BallastError;
    e.code = code;
    if (event) e.event = event;
    if (status) e.status = status;
    this.safe(this.o.onError as Callback | undefined, e);
    return e;
  }

  /** Builds the event now (the identity as of this call) and queues it once loaded, in call order. */
  private send(type: string, build: () => ApiObject, options: ApiOptions | undefined, done?: Callback): Promise<void> {
    const id = this.id();
    const fields = build();
    const ev: ApiObject = {
      type,
      channel: "web",
      anonymousId: options?.anonymousId || id.anonymousId(),
      ...fields,
      context: { ...context(id.get("traits")), ...obj(options?.context) },
      integrations: obj(options?.integrations) || { All: true },
      messageId: uuid(),
      originalTimestamp: options?.originalTimestamp || new Date().toISOString(),
    };
    const uid = id.get("userId");
    if (uid && !("userId" in ev)) ev.userId = uid;
    const b = JSON.stringify(ev);
    const p = this.loaded.then(
      () =>
        new Promise<void>((res, rej) => {
          this.pend.push({ b, n: utf8.encode(b).length, ev, res, rej });
          this.schedule();
        }),
    );
    if (done) p.then(() => this.safe(done), () => undefined);
    return p;
  }

  private schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    this.chain = this.chain.then(async () => {
      this.scheduled = false;
      const batch = this.pend.splice(0);
      let ok: boolean[];
      try {
        ok = await this.backend!.append(batch, this.o.maxQueueBytes);
      } catch (e) {
        for (const p of batch) p.rej(this.err("storage", "the event could not be stored: " + String(e), p.ev));
        return;
      }
      batch.forEach((p, i) => {
        if (ok[i]) {
          this.st.queued++;
          p.res();
        } else {
          this.st.refused++;
          p.rej(this.err("queue_full", `the queue is full (${this.o.maxQueueBytes} bytes): event refused`, p.ev));
        }
      });
      if (ok.some(Boolean)) {
        this.sender?.nudge();
        this.bc?.postMessage(1);
      }
    });
  }

  track(event: string, ...rest: unknown[]): Promise<void> {
    const [[properties, options], done] = cb(rest);
    return this.send(
      "track",
      () => ({ event, properties: obj(properties) || {} }),
      obj(options) as ApiOptions,
      done,
    );
  }

  /** `page()`, `page(name)`, `page(category, name)`, each optionally followed by properties and options. */
  page(...args: unknown[]): Promise<void> {
    const [a, done] = cb(args);
    const strings: string[] = [];
    while (strings.length < 2 && (typeof a[0] === "string" || a[0] == null) && a.length) {
      const v = a.shift();
      if (typeof v === "string") strings.push(v);
    }
    const [category, name] = strings.length === 2 ? strings : [undefined, strings[0]];
    const [properties, options] = a;
    return this.send(
      "page",
      () => {
        const f: ApiObject = { properties: { ...pageProps(), ...obj(properties) } };
        if (name) f.name = f.properties.name = name;
        if (category) f.category = f.properties.category = category;
        return f;
      },
      obj(options) as ApiOptions,
      done,
    );
  }

  /** `identify(userId?, traits?, options?)`; a different userId than the stored one starts a new user's traits. */
  identify(...args: unknown[]): Promise<void> {
    const [a, done] = cb(args);
    if (typeof a[0] === "object" && a[0] !== null) a.unshift(undefined);
    const [userId, traits, options] = a;
    return this.send(
      "identify",
      () => {
        const id = this.id();
        const cur = id.get("userId");
        if (userId != null && userId !== "" && String(userId) !== cur) {
          if (cur) id.set("traits", undefined);
          id.set("userId", String(userId));
        }
        id.set("traits", { ...obj(id.get("traits")), ...obj(traits) });
        const f: ApiObject = {};
        const uid = id.get("userId");
        if (uid) f.userId = uid;
        return f;
      },
      obj(options) as ApiOptions,
      done,
    );
  }

  group(...args: unknown[]): Promise<void> {
    const [a, done] = cb(args);
    if (typeof a[0] === "object" && a[0] !== null) a.unshift(undefined);
    const [groupId, traits, options] = a;
    return this.send(
      "group",
      () => {
        const id = this.id();
        if (groupId != null && groupId !== "") id.set("groupId", String(groupId));
        id.set("groupTraits", { ...obj(id.get("groupTraits")), ...obj(traits) });
        return { groupId: id.get("groupId"), traits: id.get("groupTraits") };
      },
      obj(options) as ApiOptions,
      done,
    );
  }

  alias(...args: unknown[]): Promise<void> {
    const [a, done] = cb(args);
    const [to, from, options] = a;
    return this.send(
      "alias",
      () => {
        const id = this.id();
        const previousId = (typeof from === "string" && from) || id.get("userId") || id.anonymousId();
        id.set("userId", String(to));
        return { userId: String(to), previousId };
      },
      obj(options) as ApiOptions,
      done,
    );
  }

  /** Forgets the user (userId, traits, group); `reset(true)` also starts a new anonymousId. */
  reset(resetAnonymousId?: boolean) {
    const id = this.id();
    for (const f of ["userId", "traits", "groupId", "groupTraits"] as Field[]) id.set(f, undefined);
    if (resetAnonymousId) id.set("anonymousId", uuid());
  }

  getAnonymousId(): string {
    return this.id().anonymousId();
  }

  setAnonymousId(anonymousId?: string) {
    this.id().set("anonymousId", anonymousId || uuid());
  }

  getUserId(): string | undefined {
    return this.id().get("userId") as string | undefined;
  }

  getUserTraits(): ApiObject | undefined {
    return obj(this.id().get("traits"));
  }

  ready(callback: Callback) {
    if (this.isLoaded) setTimeout(() => this.safe(callback));
    else this.readyCbs.push(callback);
  }

  /** Counters since this page loaded, and where the queue lives. */
  stats(): Stats {
    return {
      ...this.st,
      storage: this.backend?.kind ?? "none",
      sender: !!this.sender?.holding,
    };
  }

  /** Events queued and bytes counted (queue + dead letters), for all tabs. */
  async queueSize(): Promise<{ events: number; bytes: number }> {
    await this.loaded;
    return this.backend!.size();
  }

  /** The events the server refused for good (400/413), oldest first. */
  async deadLetters(): Promise<DeadLetter[]> {
    await this.loaded;
    return this.backend!.deadLetters();
  }

  /** Empties the dead-letter store (its bytes stop counting against `maxQueueBytes`). */
  async clearDeadLetters(): Promise<void> {
    await this.loaded;
    return this.backend!.clearDeadLetters();
  }
}
