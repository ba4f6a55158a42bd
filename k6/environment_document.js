// GET /api/v1/environment-document/ (server key; what SDKs in local-evaluation mode and downstream proxies
// poll), half of the requests conditional, at a fixed arrival rate:
//   k6 run -e BASE_URL=http://localhost:8000 -e SERVER_KEY=ser.demo_server_key k6/environment_document.js
import http from "k6/http";
import { check } from "k6";

const BASE_URL = __ENV.BASE_URL || "http://localhost:8000";
const SERVER_KEY = __ENV.SERVER_KEY || "ser.demo_server_key";

export const options = {
  scenarios: {
    document: {
      executor: "constant-arrival-rate",
      rate: Number(__ENV.RATE || 200),
      timeUnit: "1s",
      duration: __ENV.DURATION || "30s",
      preAllocatedVUs: Number(__ENV.VUS || 50),
    },
  },
  thresholds: {
    http_req_failed: ["rate<0.001"],
    http_req_duration: [`p(99)<${__ENV.P99_MS || 100}`],
    checks: ["rate>0.999"],
  },
};

let lastModified = null;

export default function () {
  const headers = { "X-Environment-Key": SERVER_KEY, "Accept-Encoding": "gzip" };
  if (lastModified && Math.random() < 0.5) headers["If-Modified-Since"] = lastModified;
  const response = http.get(`${BASE_URL}/api/v1/environment-document/`, { headers });
  lastModified = response.headers["Last-Modified"] || lastModified;
  check(response, { "200 or 304": (r) => r.status === 200 || r.status === 304 });
}
