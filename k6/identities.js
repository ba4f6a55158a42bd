// POST /api/v1/identities/ with a random identifier among USERS and its traits (with many users nearly every
// request is evaluated, as real SDK traffic is), at a fixed arrival rate:
//   k6 run -e BASE_URL=http://localhost:8000 -e CLIENT_KEY=demo_client_key -e RATE=300 -e USERS=100000 k6/identities.js
import http from "k6/http";
import { check } from "k6";
import { BASE_URL, CLIENT_KEY, USERS, arrivalOptions, identityBody } from "./common.js";

export const options = arrivalOptions("identities", 300, 100);

export default function () {
  const user = Math.floor(Math.random() * USERS);
  const response = http.post(`${BASE_URL}/api/v1/identities/`, identityBody(user), {
    headers: { "X-Environment-Key": CLIENT_KEY, "Content-Type": "application/json" },
  });
  check(response, {
    "status is 200": (r) => r.status === 200,
    "flags for the identity": (r) => r.json("identifier") === `user-${user}` && r.json("flags").length > 0,
  });
}
