// GET /api/v1/environment-document/ (server key; what SDKs in local-evaluation mode and downstream proxies
// poll), half of the requests conditional, at a fixed arrival rate:
//   k6 run -e BASE_URL=http://localhost:8000 -e SERVER_KEY=ser.demo_server_key k6/environment_document.js
import http from "k6/http";
import { check } from "k6";
import { BASE_URL, SERVER_KEY, arrivalOptions } from "./common.js";

export const options = arrivalOptions("document", 200, 100);

let lastModified = null;

export default function () {
  const headers = { "X-Environment-Key": SERVER_KEY, "Accept-Encoding": "gzip" };
  if (lastModified && Math.random() < 0.5) headers["If-Modified-Since"] = lastModified;
  const response = http.get(`${BASE_URL}/api/v1/environment-document/`, { headers });
  lastModified = response.headers["Last-Modified"] || lastModified;
  check(response, { "200 or 304": (r) => r.status === 200 || r.status === 304 });
}
