// Builds dist/ballast.min.js (script tag: one self-contained file defining window.ballast),
// dist/index.js (ESM) and dist/types (declarations), then copies the script-tag bundle to
// crates/ballast/src/gateway/sdk/ballast.min.js, which the server compiles in.
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const { version } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const common = { bundle: true, target: ["es2020"], logLevel: "warning", legalComments: "none" };

await build({
  ...common,
  entryPoints: [join(root, "src/global.ts")],
  outfile: join(root, "dist/ballast.min.js"),
  format: "iife",
  minify: true,
  banner: { js: `/* ballast browser SDK ${version} */` },
});
await build({
  ...common,
  entryPoints: [join(root, "src/index.ts")],
  outfile: join(root, "dist/index.js"),
  format: "esm",
});
execFileSync(join(root, "node_modules/.bin/tsc"), ["-p", root], { stdio: "inherit" });

const served = join(root, "../../crates/ballast/src/gateway/sdk/ballast.min.js");
mkdirSync(dirname(served), { recursive: true });
copyFileSync(join(root, "dist/ballast.min.js"), served);
