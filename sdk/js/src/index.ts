// The npm entry (ESM): `import { Ballast } from "@ballast/analytics"; const b = new Ballast(); b.load(…)`.
export { Ballast } from "./ballast";
export { decodeRl, VERSION } from "./identity";
export type { ApiObject, ApiOptions, BallastError, DeadLetter, ErrorCode, LoadOptions, Stats } from "./types";
