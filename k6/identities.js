// POST /api/v1/identities/ with a random identifier and traits (every request is evaluated, as real SDK
// traffic with many users is), at a fixed arrival rate:
//   k6 run -e BASE_URL=http://localhost:8000 -e ENV_KEY=demo_client_key -e RATE=300 -e USERS=100000 k6/identities.js
import http from "k6/http";
import { check } from "k6";
import { BASE_URL, arrivalOptions } from "./common.js";

const ENV_KEY = __ENV.ENV_KEY || "demo_client_key";
const USERS = Number(__ENV.USERS || 100000);
const PLANS = ["free", "premium", "enterprise"];

export const options = arrivalOptions("identities", 300, 100);

export default function () {
  const user = Math.floor(Math.random() * USERS);
  const body = JSON.stringify({
    identifier: `user-${user}`,
    traits: [
      { trait_key: "plan", trait_value: PLANS[user % PLANS.length] },
      { trait_key: "age", trait_value: 18 + (user % 60) },
      { trait_key: "beta", trait_value: user % 2 === 0 },
    ],
  });
  const response = http.post(`${BASE_URL}/api/v1/identities/`, body, {
    headers: { "X-Environment-Key": ENV_KEY, "Content-Type": "application/json" },
  });
  check(response, {
    "status is 200": (r) => r.status === 200,
    "flags for the identity": (r) => r.json("identifier") === `user-${user}` && r.json("flags").length > 0,
  });
}
