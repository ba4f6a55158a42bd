// GET /api/v1/flags/ at a fixed arrival rate. Configure with environment variables:
//   k6 run -e BASE_URL=http://localhost:8000 -e ENV_KEY=demo_client_key -e RATE=500 -e DURATION=30s k6/flags.js
import http from "k6/http";
import { check } from "k6";

const BASE_URL = __ENV.BASE_URL || "http://localhost:8000";
const ENV_KEY = __ENV.ENV_KEY || "demo_client_key";

export const options = {
  discardResponseBodies: false,
  scenarios: {
    flags: {
      executor: "constant-arrival-rate",
      rate: Number(__ENV.RATE || 500),
      timeUnit: "1s",
      duration: __ENV.DURATION || "30s",
      preAllocatedVUs: Number(__ENV.VUS || 50),
    },
  },
  thresholds: {
    http_req_failed: ["rate<0.001"],
    http_req_duration: [`p(99)<${__ENV.P99_MS || 50}`],
    checks: ["rate>0.999"],
  },
};

export default function () {
  const response = http.get(`${BASE_URL}/api/v1/flags/`, { headers: { "X-Environment-Key": ENV_KEY } });
  check(response, {
    "status is 200": (r) => r.status === 200,
    "a list of flags": (r) => Array.isArray(r.json()) && r.json().length > 0,
  });
}
