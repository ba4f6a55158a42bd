// Shared by every scenario: the same variables everywhere, and a constant arrival rate with error-rate,
// p99 and check thresholds.
//   BASE_URL    the proxy (default http://localhost:8000)
//   CLIENT_KEY  a client-side environment key (flags, identities, analytics; default the demo's)
//   SERVER_KEY  a server-side key of the same environment (environment document; default the demo's)
//   RATE        requests per second (each script has its own default)
//   DURATION    how long (default 30s)
//   VUS         pre-allocated virtual users (default 50)
//   P99_MS      the p99 bound of http_req_duration, in ms (each script has its own default)
//   USERS       distinct identities (identities and mixed; default 100000)
if (__ENV.ENV_KEY) {
  throw new Error("ENV_KEY is now CLIENT_KEY (and SERVER_KEY for the environment document): see k6/README.md");
}

export const BASE_URL = __ENV.BASE_URL || "http://localhost:8000";
export const CLIENT_KEY = __ENV.CLIENT_KEY || "demo_client_key";
export const SERVER_KEY = __ENV.SERVER_KEY || "ser.demo_server_key";
export const USERS = Number(__ENV.USERS || 100000);
export const DURATION = __ENV.DURATION || "30s";
export const VUS = Number(__ENV.VUS || 50);

export function rate(defaultRate) {
  return Number(__ENV.RATE || defaultRate);
}

// The p99 bound in ms: P99_MS when given, else the script's own.
export function p99(defaultMs) {
  return Number(__ENV.P99_MS || defaultMs);
}

export function thresholds(defaultP99Ms) {
  return {
    http_req_failed: ["rate<0.001"],
    http_req_duration: [`p(99)<${p99(defaultP99Ms)}`],
    checks: ["rate>0.999"],
    // an arrival rate the VUs could not keep up with means the numbers above are not for that rate
    dropped_iterations: ["count==0"],
    http_reqs: ["count>0"],
  };
}

export function arrivalOptions(name, defaultRate, defaultP99Ms) {
  return {
    scenarios: {
      [name]: {
        executor: "constant-arrival-rate",
        rate: rate(defaultRate),
        timeUnit: "1s",
        duration: DURATION,
        preAllocatedVUs: VUS,
      },
    },
    thresholds: thresholds(defaultP99Ms),
  };
}

const PLANS = ["free", "premium", "enterprise"];

// An identity request body for user number `user`: traits derived from the number, so a repeated user sends
// the same traits (as an SDK does) and the proxy's identity cache can answer it.
export function identityBody(user) {
  return JSON.stringify({
    identifier: `user-${user}`,
    traits: [
      { trait_key: "plan", trait_value: PLANS[user % PLANS.length] },
      { trait_key: "age", trait_value: 18 + (user % 60) },
      { trait_key: "beta", trait_value: user % 2 === 0 },
    ],
  });
}
