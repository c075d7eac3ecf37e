// Unit tests of the SDK's pure parts (node:test): analytics-js value decoding, Retry-After,
// backoff, the batch body. The browser parts are tested in headless Chromium
// (crates/ballast/tests/browser_sdk.rs).
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import test from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const outfile = join(root, "dist/unit.mjs");
await build({
  stdin: {
    contents: 'export * from "./src/sender.ts"; export { decodeRl } from "./src/identity.ts";',
    resolveDir: root,
    loader: "ts",
  },
  bundle: true,
  format: "esm",
  platform: "neutral",
  outfile,
  logLevel: "warning",
});
const { decodeRl, retryAfterMs, backoffMs, batchBody } = await import(pathToFileURL(outfile).href);

const v3 = (s) => "RS_ENC_v3_" + Buffer.from(JSON.stringify(s), "utf8").toString("base64");

test("analytics-js v3 values: cookie, localStorage, plain, objects, UTF-8", () => {
  const id = "1a2b3c4d-0000-4000-8000-000000000000";
  assert.equal(decodeRl(v3(id)), id);
  // localStorage (store.js) keeps the encrypted string JSON-encoded once more.
  assert.equal(decodeRl(JSON.stringify(v3(id))), id);
  assert.equal(decodeRl(id), id);
  assert.equal(decodeRl(JSON.stringify(id)), id);
  assert.deepEqual(decodeRl(v3({ plan: "pro", name: "Zoë" })), { plan: "pro", name: "Zoë" });
  assert.equal(decodeRl(v3("ünïcødé")), "ünïcødé");
  // v1's AES values are not read; nothing is not a value.
  assert.equal(decodeRl("RudderEncrypt:U2FsdGVkX1abc"), undefined);
  assert.equal(decodeRl(undefined), undefined);
  assert.equal(decodeRl(""), undefined);
  assert.equal(decodeRl("RS_ENC_v3_!!not base64!!"), undefined);
});

test("Retry-After: seconds, an HTTP date, garbage", () => {
  assert.equal(retryAfterMs("2"), 2000);
  assert.equal(retryAfterMs(" 0 "), 0);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(retryAfterMs("Thu, 01 Jan 2026 00:00:30 GMT", now), 30000);
  assert.equal(retryAfterMs("Wed, 31 Dec 2025 00:00:00 GMT", now), 0);
  assert.equal(retryAfterMs("soon"), 0);
  assert.equal(retryAfterMs(null), 0);
});

test("backoff: full jitter up to base·2^(n-1), capped; Retry-After a capped floor", () => {
  const o = { retryBaseMs: 1000, retryCapMs: 300000, retryAfterCapMs: 60000 };
  assert.equal(backoffMs(o, 1, 0, 1), 1000);
  assert.equal(backoffMs(o, 3, 0, 1), 4000);
  assert.equal(backoffMs(o, 3, 0, 0), 0);
  assert.equal(backoffMs(o, 50, 0, 1), 300000);
  assert.equal(backoffMs(o, 1000, 0, 0.5), 150000);
  assert.equal(backoffMs(o, 1, 5000, 0), 5000);
  assert.equal(backoffMs(o, 1, 600000, 0), 60000);
  assert.equal(backoffMs(o, 20, 5000, 1), 300000);
});

test("the batch body keeps the queue order and gives every event its sentAt", () => {
  const items = [
    { k: 1, b: JSON.stringify({ type: "track", messageId: "a" }), n: 0 },
    { k: 2, b: JSON.stringify({ type: "page", messageId: "b", properties: { x: "}" } }), n: 0 },
  ];
  const body = JSON.parse(batchBody(items, "2026-01-01T00:00:00.000Z"));
  assert.deepEqual(
    body.batch.map((e) => e.messageId),
    ["a", "b"],
  );
  assert.ok(body.batch.every((e) => e.sentAt === "2026-01-01T00:00:00.000Z"));
  assert.equal(body.sentAt, "2026-01-01T00:00:00.000Z");
  assert.equal(body.batch[1].properties.x, "}");
});
