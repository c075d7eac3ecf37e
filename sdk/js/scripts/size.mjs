// The size budget: dist/ballast.min.js minified + gzipped (level 9) must stay within 12 KiB.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const BUDGET = 12 * 1024;
const file = join(dirname(fileURLToPath(import.meta.url)), "../dist/ballast.min.js");
const raw = readFileSync(file);
const gz = gzipSync(raw, { level: 9 }).length;
console.log(`ballast.min.js: ${raw.length} bytes minified, ${gz} bytes min+gz (budget ${BUDGET})`);
if (gz > BUDGET) {
  console.error(`over the size budget by ${gz - BUDGET} bytes`);
  process.exit(1);
}
