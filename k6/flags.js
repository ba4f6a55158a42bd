// GET /api/v1/flags/ (what browser and mobile SDKs ask) at a fixed arrival rate:
//   k6 run -e BASE_URL=http://localhost:8000 -e CLIENT_KEY=demo_client_key -e RATE=500 -e DURATION=30s k6/flags.js
import http from "k6/http";
import { check } from "k6";
import { BASE_URL, CLIENT_KEY, arrivalOptions } from "./common.js";

export const options = arrivalOptions("flags", 500, 50);

export default function () {
  const response = http.get(`${BASE_URL}/api/v1/flags/`, { headers: { "X-Environment-Key": CLIENT_KEY } });
  check(response, {
    "status is 200": (r) => r.status === 200,
    "a list of flags": (r) => Array.isArray(r.json()) && r.json().length > 0,
  });
}
