// The script-tag entry: defines `window.ballast`. Calls a page queued before the file loaded, as
// `window.ballast = [["load", …], ["track", …]]`, are made in order.
import { Ballast } from "./ballast";

declare global {
  interface Window {
    ballast: Ballast | unknown[][] | undefined;
  }
}

const queued = window.ballast;
if (!(window.ballast instanceof Ballast)) {
  const b = new Ballast();
  window.ballast = b;
  if (Array.isArray(queued)) {
    for (const [method, ...args] of queued) {
      const f = (b as unknown as Record<string, (...a: unknown[]) => unknown>)[method as string];
      if (typeof f === "function") f.apply(b, args);
    }
  }
}
