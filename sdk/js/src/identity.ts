// Who the user is (anonymousId, userId, traits, group), kept in localStorage and shared by the
// site's tabs; an existing analytics-js identity (`rl_*` cookies or localStorage) is taken over.
// And the event's context, as analytics-js v3 fills it.

import type { ApiObject } from "./types";

export const VERSION = "0.1.0";

const KEYS = {
  anonymousId: "rl_anonymous_id",
  userId: "rl_user_id",
  traits: "rl_trait",
  groupId: "rl_group_id",
  groupTraits: "rl_group_trait",
} as const;
export type Field = keyof typeof KEYS;

/** analytics-js v3 stores a value as JSON text, prefixed `RS_ENC_v3_` + base64 of its UTF-8
 * bytes; in localStorage that is JSON-encoded once more (store.js), in a cookie URL-encoded.
 * v1's `RudderEncrypt:` (AES) values are not read. */
export function decodeRl(raw: string | null | undefined): unknown {
  let v: unknown = raw;
  for (let i = 0; i < 6 && typeof v === "string"; i++) {
    const s: string = v;
    if (!s || s.startsWith("RudderEncrypt:")) return undefined;
    if (s.startsWith("RS_ENC_v3_")) {
      try {
        const bin = atob(s.slice(10));
        v = new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
      } catch {
        return undefined;
      }
      continue;
    }
    try {
      const p: unknown = JSON.parse(s);
      if (p === s) return s;
      if (typeof p !== "string" && typeof p !== "object") return s;
      v = p;
    } catch {
      return s;
    }
  }
  return v;
}

function cookie(name: string): string | undefined {
  for (const part of document.cookie.split(";")) {
    const i = part.indexOf("=");
    if (i > 0 && part.slice(0, i).trim() === name) {
      try {
        return decodeURIComponent(part.slice(i + 1).trim());
      } catch {
        return part.slice(i + 1).trim();
      }
    }
  }
  return undefined;
}

function lsGet(key: string): string | null {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

/** False when localStorage refused: the identity then lives for this page only. */
function lsSet(key: string, value: unknown): boolean {
  try {
    if (value === undefined || value === null || value === "") localStorage.removeItem(key);
    else localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

export function uuid(): string {
  if (typeof crypto !== "undefined" && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 15) | 64;
  b[8] = (b[8] & 63) | 128;
  const h = Array.from(b, (x) => (x + 256).toString(16).slice(1)).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** The identity, read from this SDK's keys (`ballast.<field>`), else analytics-js's. */
export class Identity {
  private mem: Partial<Record<Field, unknown>> = {};

  /** Takes over analytics-js's identity once per site (its cookie first, its default storage, then
   * localStorage); afterwards only this SDK's own keys count (a `reset` stays a reset). */
  constructor() {
    if (lsGet("ballast.migrated")) return;
    for (const f of Object.keys(KEYS) as Field[]) {
      if (lsGet("ballast." + f) !== null) continue;
      const v = decodeRl(cookie(KEYS[f]) ?? lsGet(KEYS[f]));
      if (typeof v === "string" ? v !== "" : !!v && typeof v === "object") this.set(f, v);
    }
    lsSet("ballast.migrated", 1);
  }

  get(f: Field): unknown {
    const own = lsGet("ballast." + f);
    if (own !== null) {
      try {
        return JSON.parse(own);
      } catch {
        return undefined;
      }
    }
    return this.mem[f];
  }

  set(f: Field, v: unknown) {
    if (lsSet("ballast." + f, v)) delete this.mem[f];
    else this.mem[f] = v;
  }

  anonymousId(): string {
    let a = this.get("anonymousId");
    if (typeof a !== "string" || !a) {
      a = uuid();
      this.set("anonymousId", a);
    }
    return a as string;
  }
}

function referringDomain(ref: string): string {
  try {
    return ref ? new URL(ref).hostname : "";
  } catch {
    return "";
  }
}

/** `context.page` (and the page call's own properties) as analytics-js sends them. */
export function pageProps(): ApiObject {
  const l = location;
  const ref = document.referrer;
  let init: { r: string; d: string } = { r: ref, d: referringDomain(ref) };
  try {
    const s = sessionStorage.getItem("ballast.initialReferrer");
    if (s) init = JSON.parse(s);
    else sessionStorage.setItem("ballast.initialReferrer", JSON.stringify(init));
  } catch {
    // No sessionStorage: this page's referrer.
  }
  const canon = document.querySelector("link[rel='canonical']")?.getAttribute("href");
  return {
    path: l.pathname,
    referrer: ref || "$direct",
    referring_domain: referringDomain(ref),
    search: l.search,
    title: document.title,
    url: canon && /^https?:/.test(canon) ? canon : l.href,
    tab_url: l.href,
    initial_referrer: init.r || "$direct",
    initial_referring_domain: init.d,
  };
}

const UTM: Record<string, string> = { campaign: "name", source: "source", medium: "medium", term: "term", content: "content" };

function campaign(): ApiObject | undefined {
  const out: ApiObject = {};
  let any = false;
  new URLSearchParams(location.search).forEach((v, k) => {
    if (k.startsWith("utm_")) {
      out[UTM[k.slice(4)] || k.slice(4)] = v;
      any = true;
    }
  });
  return any ? out : undefined;
}

export function context(traits: unknown): ApiObject {
  const n = navigator;
  const ctx: ApiObject = {
    app: { name: "ballast-js", namespace: "ballast", version: VERSION, installType: "cdn" },
    library: { name: "ballast JavaScript SDK", version: VERSION },
    userAgent: n.userAgent,
    locale: n.language || "",
    os: { name: "", version: "" },
    screen: {
      width: screen.width,
      height: screen.height,
      density: devicePixelRatio,
      innerWidth: innerWidth,
      innerHeight: innerHeight,
    },
    page: pageProps(),
    traits: traits && typeof traits === "object" ? traits : {},
  };
  const c = campaign();
  if (c) ctx.campaign = c;
  return ctx;
}
