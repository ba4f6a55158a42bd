// Shared by the scenarios: a constant arrival rate with error-rate, p99 and check thresholds,
// configured with -e RATE=… -e DURATION=… -e VUS=… -e P99_MS=….
export const BASE_URL = __ENV.BASE_URL || "http://localhost:8000";

export function arrivalOptions(name, defaultRate, defaultP99Ms) {
  return {
    scenarios: {
      [name]: {
        executor: "constant-arrival-rate",
        rate: Number(__ENV.RATE || defaultRate),
        timeUnit: "1s",
        duration: __ENV.DURATION || "30s",
        preAllocatedVUs: Number(__ENV.VUS || 50),
      },
    },
    thresholds: {
      http_req_failed: ["rate<0.001"],
      http_req_duration: [`p(99)<${__ENV.P99_MS || defaultP99Ms}`],
      checks: ["rate>0.999"],
    },
  };
}
