// The on-device queue: IndexedDB (every write a `durability: "strict"` transaction that has
// completed before the caller hears of it), or a visible fallback (localStorage, else memory).
// Items are kept in key order (the order the page called); a byte total kept beside them in the
// same transactions bounds queue + dead letters; nothing is ever evicted to make room.

import type { DeadLetter } from "./types";

/** One queued event: its key (queue order) and its JSON text. */
export interface Item {
  k: number;
  b: string;
  n: number;
}

export interface Backend {
  kind: "indexeddb" | "localStorage" | "memory";
  /** Stores the bodies that fit under `max` bytes in order; says which were stored. Resolves once durable. */
  append(items: { b: string; n: number }[], max: number): Promise<boolean[]>;
  /** The head of the queue: at most `events` items and `bytes` bytes (at least one item if any). */
  head(events: number, bytes: number): Promise<Item[]>;
  /** Removes items (a readable 2xx answered them). */
  remove(keys: number[]): Promise<void>;
  /** Moves an item to the dead-letter store (its bytes stay counted). */
  dead(item: Item, status: number, reason: string): Promise<void>;
  deadLetters(): Promise<DeadLetter[]>;
  clearDeadLetters(): Promise<void>;
  /** Events queued and bytes counted (queue + dead letters). */
  size(): Promise<{ events: number; bytes: number }>;
}

const Q = "queue";
const D = "dead";
const M = "meta";
const STRICT = { durability: "strict" } as IDBTransactionOptions;

function req<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((res, rej) => {
    r.onsuccess = () => res(r.result);
    r.onerror = () => rej(r.error);
  });
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((res, rej) => {
    tx.oncomplete = () => res();
    tx.onerror = tx.onabort = () => rej(tx.error || new Error("transaction aborted"));
  });
}

export function openIdb(name: string): Promise<Backend> {
  return new Promise((res, rej) => {
    let open: IDBOpenDBRequest;
    try {
      open = indexedDB.open(name, 1);
    } catch (e) {
      rej(e);
      return;
    }
    open.onupgradeneeded = () => {
      const db = open.result;
      db.createObjectStore(Q, { autoIncrement: true });
      db.createObjectStore(D, { autoIncrement: true });
      db.createObjectStore(M);
    };
    open.onerror = () => rej(open.error);
    open.onblocked = () => rej(new Error("IndexedDB open blocked"));
    open.onsuccess = () => res(new Idb(open.result));
  });
}

class Idb implements Backend {
  kind = "indexeddb" as const;
  constructor(private db: IDBDatabase) {
    // Another version wants the database: let it (this page's queue calls then fail visibly).
    db.onversionchange = () => db.close();
  }

  private tx(stores: string[], mode: IDBTransactionMode): IDBTransaction {
    return mode === "readwrite" ? this.db.transaction(stores, mode, STRICT) : this.db.transaction(stores, mode);
  }

  async append(items: { b: string; n: number }[], max: number): Promise<boolean[]> {
    const tx = this.tx([Q, M], "readwrite");
    const end = done(tx);
    const q = tx.objectStore(Q);
    const m = tx.objectStore(M);
    const out: boolean[] = [];
    let total = ((await req(m.get("bytes"))) as number) || 0;
    for (const it of items) {
      const fits = total + it.n <= max;
      out.push(fits);
      if (fits) {
        total += it.n;
        q.add({ b: it.b, n: it.n });
      }
    }
    m.put(total, "bytes");
    await end;
    return out;
  }

  async head(events: number, bytes: number): Promise<Item[]> {
    const tx = this.tx([Q], "readonly");
    const out: Item[] = [];
    let sum = 0;
    await new Promise<void>((res, rej) => {
      const c = tx.objectStore(Q).openCursor();
      c.onerror = () => rej(c.error);
      c.onsuccess = () => {
        const cur = c.result;
        if (!cur) return res();
        const v = cur.value as { b: string; n: number };
        if (out.length && (out.length >= events || sum + v.n > bytes)) return res();
        out.push({ k: cur.primaryKey as number, b: v.b, n: v.n });
        sum += v.n;
        cur.continue();
      };
    });
    return out;
  }

  async remove(keys: number[]): Promise<void> {
    const tx = this.tx([Q, M], "readwrite");
    const end = done(tx);
    const q = tx.objectStore(Q);
    const m = tx.objectStore(M);
    let total = ((await req(m.get("bytes"))) as number) || 0;
    // Only what is still there is subtracted (another sender may have removed it already).
    const found = await Promise.all(keys.map((k) => req(q.get(k))));
    keys.forEach((k, i) => {
      const v = found[i] as { n: number } | undefined;
      if (v) {
        total -= v.n;
        q.delete(k);
      }
    });
    m.put(Math.max(0, total), "bytes");
    await end;
  }

  async dead(item: Item, status: number, reason: string): Promise<void> {
    const tx = this.tx([Q, D], "readwrite");
    const end = done(tx);
    const q = tx.objectStore(Q);
    if (await req(q.get(item.k))) {
      tx.objectStore(D).add({ b: item.b, n: item.n, status, reason, at: new Date().toISOString() });
      q.delete(item.k);
    }
    await end;
  }

  async deadLetters(): Promise<DeadLetter[]> {
    const all = (await req(this.tx([D], "readonly").objectStore(D).getAll())) as {
      b: string;
      status: number;
      reason: string;
      at: string;
    }[];
    return all.map((d) => ({ event: JSON.parse(d.b), status: d.status, reason: d.reason, at: d.at }));
  }

  async clearDeadLetters(): Promise<void> {
    const tx = this.tx([D, M], "readwrite");
    const end = done(tx);
    const all = (await req(tx.objectStore(D).getAll())) as { n: number }[];
    const m = tx.objectStore(M);
    const total = ((await req(m.get("bytes"))) as number) || 0;
    tx.objectStore(D).clear();
    m.put(Math.max(0, total - all.reduce((s, d) => s + d.n, 0)), "bytes");
    await end;
  }

  async size(): Promise<{ events: number; bytes: number }> {
    const tx = this.tx([Q, M], "readonly");
    const [events, bytes] = await Promise.all([req(tx.objectStore(Q).count()), req(tx.objectStore(M).get("bytes"))]);
    return { events, bytes: (bytes as number) || 0 };
  }
}

interface Snapshot {
  next: number;
  bytes: number;
  q: [number, string, number][];
  d: { b: string; n: number; status: number; reason: string; at: string }[];
}

/** The fallback: one JSON document in localStorage (read, changed and written synchronously),
 * or in memory only when `key` is null or localStorage refuses. */
export class Simple implements Backend {
  kind: "localStorage" | "memory";
  private mem: Snapshot = { next: 1, bytes: 0, q: [], d: [] };
  constructor(
    private key: string | null,
    private onFail: (e: unknown) => void,
  ) {
    this.kind = key ? "localStorage" : "memory";
  }

  private load(): Snapshot {
    if (this.key) {
      try {
        const s = localStorage.getItem(this.key);
        if (s) return JSON.parse(s) as Snapshot;
        return { next: 1, bytes: 0, q: [], d: [] };
      } catch (e) {
        this.fail(e);
      }
    }
    return this.mem;
  }

  private save(s: Snapshot) {
    this.mem = s;
    if (this.key) {
      try {
        localStorage.setItem(this.key, JSON.stringify(s));
      } catch (e) {
        this.fail(e);
      }
    }
  }

  private fail(e: unknown) {
    this.key = null;
    this.kind = "memory";
    this.onFail(e);
  }

  async append(items: { b: string; n: number }[], max: number): Promise<boolean[]> {
    const s = this.load();
    const out = items.map((it) => {
      if (s.bytes + it.n > max) return false;
      s.bytes += it.n;
      s.q.push([s.next++, it.b, it.n]);
      return true;
    });
    this.save(s);
    return out;
  }

  async head(events: number, bytes: number): Promise<Item[]> {
    const out: Item[] = [];
    let sum = 0;
    for (const [k, b, n] of this.load().q) {
      if (out.length && (out.length >= events || sum + n > bytes)) break;
      out.push({ k, b, n });
      sum += n;
    }
    return out;
  }

  async remove(keys: number[]): Promise<void> {
    const s = this.load();
    const gone = new Set(keys);
    s.q = s.q.filter(([k, , n]) => {
      if (!gone.has(k)) return true;
      s.bytes -= n;
      return false;
    });
    this.save(s);
  }

  async dead(item: Item, status: number, reason: string): Promise<void> {
    const s = this.load();
    const before = s.q.length;
    s.q = s.q.filter(([k]) => k !== item.k);
    if (s.q.length < before) s.d.push({ b: item.b, n: item.n, status, reason, at: new Date().toISOString() });
    this.save(s);
  }

  async deadLetters(): Promise<DeadLetter[]> {
    return this.load().d.map((d) => ({ event: JSON.parse(d.b), status: d.status, reason: d.reason, at: d.at }));
  }

  async clearDeadLetters(): Promise<void> {
    const s = this.load();
    for (const d of s.d) s.bytes -= d.n;
    s.d = [];
    this.save(s);
  }

  async size(): Promise<{ events: number; bytes: number }> {
    const s = this.load();
    return { events: s.q.length, bytes: s.bytes };
  }
}
