// A realistic mix at a total arrival rate RATE, each kind of client on its own schedule:
//   55 % browser/mobile SDKs:  GET /api/v1/flags/ (client key)
//   30 % server SDKs:          POST /api/v1/identities/, users drawn with a skew (a few are very active, so
//                              some answers come from the identity cache, most are evaluated)
//    5 % server SDKs:          GET /api/v1/identities/?identifier= (no traits)
//    5 % local-evaluation SDKs: GET /api/v1/environment-document/ with If-Modified-Since (server key)
//    5 % SDK analytics:        POST /api/v1/analytics/flags/
//   k6 run -e BASE_URL=http://localhost:8000 -e CLIENT_KEY=demo_client_key -e SERVER_KEY=ser.demo_server_key \
//          -e RATE=1000 -e DURATION=60s k6/mixed.js
import http from "k6/http";
import { check } from "k6";
import { BASE_URL, CLIENT_KEY, DURATION, SERVER_KEY, USERS, VUS, identityBody, p99, rate, thresholds } from "./common.js";

const TOTAL = rate(1000);
const SHARES = { flags: 0.55, identities: 0.3, identity_get: 0.05, document: 0.05, analytics: 0.05 };
const P99_MS = { flags: 50, identities: 100, identity_get: 100, document: 100, analytics: 50 };

function scenario(name) {
  return {
    executor: "constant-arrival-rate",
    exec: name,
    rate: Math.max(1, Math.round(TOTAL * SHARES[name])),
    timeUnit: "1s",
    duration: DURATION,
    preAllocatedVUs: Math.max(2, Math.ceil(VUS * SHARES[name])),
  };
}

const perScenario = {};
for (const name of Object.keys(SHARES)) {
  // each kind of request has its own p99 bound (P99_MS, when given, applies to all)
  perScenario[`http_req_duration{scenario:${name}}`] = [`p(99)<${p99(P99_MS[name])}`];
}

export const options = {
  scenarios: Object.fromEntries(Object.keys(SHARES).map((name) => [name, scenario(name)])),
  thresholds: { ...thresholds(100), ...perScenario },
};

const CLIENT = { "X-Environment-Key": CLIENT_KEY };

// Skewed user numbers: squaring a uniform number puts most draws on the lowest numbers.
function skewedUser() {
  const u = Math.random();
  return Math.floor(u * u * USERS);
}

export function flags() {
  const response = http.get(`${BASE_URL}/api/v1/flags/`, { headers: CLIENT });
  check(response, { "flags: 200": (r) => r.status === 200 && r.json().length > 0 });
}

export function identities() {
  const user = skewedUser();
  const response = http.post(`${BASE_URL}/api/v1/identities/`, identityBody(user), {
    headers: { ...CLIENT, "Content-Type": "application/json" },
  });
  check(response, { "identities: 200": (r) => r.status === 200 && r.json("identifier") === `user-${user}` });
}

export function identity_get() {
  const user = skewedUser();
  const response = http.get(`${BASE_URL}/api/v1/identities/?identifier=user-${user}`, { headers: CLIENT });
  check(response, { "identity get: 200": (r) => r.status === 200 && r.json("flags").length > 0 });
}

let lastModified = null;

export function document() {
  const headers = { "X-Environment-Key": SERVER_KEY, "Accept-Encoding": "gzip" };
  if (lastModified) headers["If-Modified-Since"] = lastModified;
  const response = http.get(`${BASE_URL}/api/v1/environment-document/`, { headers });
  lastModified = response.headers["Last-Modified"] || lastModified;
  check(response, { "document: 200 or 304": (r) => r.status === 200 || r.status === 304 });
}

export function analytics() {
  const body = JSON.stringify({ [`feature_${Math.floor(Math.random() * 5)}`]: 1 + Math.floor(Math.random() * 3) });
  const response = http.post(`${BASE_URL}/api/v1/analytics/flags/`, body, {
    headers: { ...CLIENT, "Content-Type": "application/json" },
  });
  check(response, { "analytics: 200": (r) => r.status === 200 });
}
