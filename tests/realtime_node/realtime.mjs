// The official Flagsmith JS client (`flagsmith/isomorphic`) with `realtime: true` against the proxy.
// Node has no `window` or global EventSource: the `eventsource` package provides the latter, and a
// `window` global makes the client open its stream as it does in a browser.
// Input (stdin JSON): {"api", "eventSourceUrl", "environmentID", "feature"}. Output: one JSON line per
// flags change, {"enabled", "at"} (at: ms since the epoch).
import { EventSource } from "eventsource";

globalThis.EventSource = EventSource;
globalThis.window = globalThis;

const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));

const { createFlagsmithInstance } = await import("flagsmith/isomorphic");
const flagsmith = createFlagsmithInstance();
await flagsmith.init({
  environmentID: input.environmentID,
  api: input.api,
  realtime: true,
  eventSourceUrl: input.eventSourceUrl,
  cacheFlags: false,
  enableAnalytics: false,
  onChange: () => {
    console.log(JSON.stringify({ enabled: flagsmith.hasFeature(input.feature), at: Date.now() }));
  },
});
setTimeout(() => process.exit(0), input.runForMs ?? 60000);
