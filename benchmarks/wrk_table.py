"""The proxy against the server's own floor, side by side, in one invocation.

Five servers run at once, each one Granian worker pinned to CPU 1 (wrk on CPU 0): the proxy serving the
conformance environment, the proxy serving the heavy profile (benchmarks/documents.py), and the fixed-bytes
floors (benchmarks/ceiling.py): a raw ASGI callable, the same through BlackSheep, and Granian's RSGI interface
(context: the proxy speaks ASGI). Only one is loaded at a time. Each round runs every row against its proxy
and against the raw-ASGI floor with the same wrk command, alternating which goes first, so drift on a shared
machine hits both sides; the share of the floor is the proxy's median req/s over the floor's for the same
method and request. Each round also runs a GET and a POST against every floor. Medians over the rounds are
reported; CPU time is read from /proc for every process of the loaded server, which gives requests per
CPU-second alongside req/s and p50/p99.

Started by `benchmarks/wrk_run.py --table` (see there for the options).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from benchmarks.ceiling import APPS
from benchmarks.documents import heavy_document
from benchmarks.wrk_run import SCENARIOS, run_wrk
from tests.fake_upstream import FakeFlagsmith
from tests.support import ProxyProcess, children, conformance_documents, free_port, proxy_config, wait_for

ROOT = Path(__file__).parents[1]
SERVER_CPU, WRK_CPU = "1", "0"

# (row label, proxy profile, scenario in wrk_run.SCENARIOS, Rust README figure it compares with)
ROWS = [
    ("GET flags (pre-encoded)", "default", "flags", "flags"),
    ("POST identities, same body (LRU hit)", "default", "post_identity", "identities"),
    ("GET identities, random identifier", "default", "get_identity_random", None),
    ("POST identities, random identifier + 3 traits", "default", "post_identity_random", "identities"),
    ("heavy profile, POST identities, random", "heavy", "post_identity_random", None),
    ("OFREP one flag, random targetingKey + 3 traits", "default", "ofrep_flag_random", None),
]
# The floors' own table: one GET and one POST (the wrk commands of these scenarios) against each floor.
FLOOR_ROWS = [("GET", "flags"), ("POST", "post_identity_random")]
# Flagsmith/edge-proxy-rs README "Performance" (1 CPU, 512 MB RAM, 50 features; tool and body not stated),
# as collected in ../shared/conformance/peer_benchmarks.json. Not measured here: for scale only.
RUST_README = {"flags": 10_075, "identities": 14_110}


@dataclass
class Target:
    name: str
    url: str
    root_pid: int
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # row label → wrk results

    def pids(self) -> list[int]:
        found, queue = [], [self.root_pid]
        while queue:
            pid = queue.pop()
            found.append(pid)
            queue.extend(children(pid))
        return found

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            try:
                fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / os.sysconf("SC_CLK_TCK")

    def pin(self) -> None:
        for pid in self.pids():
            subprocess.run(["taskset", "-a", "-p", "-c", SERVER_CPU, str(pid)], capture_output=True, check=False)


def start_floor(tmp: Path, app: str) -> tuple[subprocess.Popen[bytes], Target]:
    port = free_port()
    log = open(tmp / f"floor-{app}.log", "ab")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.ceiling", "--port", str(port), "--app", app],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(up, 30, 0.1):
        process.kill()
        raise RuntimeError(f"the {app} floor did not start: {(tmp / f'floor-{app}.log').read_text()}")
    return process, Target(app, url, process.pid)


def measure(target: Target, row: str, scenario: str, args: argparse.Namespace, warm: bool) -> None:
    path, extra = SCENARIOS[scenario]
    if warm:
        run_wrk(target.url + path, extra, args.warmup, args.connections, WRK_CPU)
    before = target.cpu_seconds()
    result = run_wrk(target.url + path, extra, args.duration, args.connections, WRK_CPU)
    result["cpu"] = target.cpu_seconds() - before
    target.runs.setdefault(row, []).append(result)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def latency_ms(text: str | None) -> float:
    """wrk's "1.58ms" / "812.00us" / "1.02s" as milliseconds."""
    if not text:
        return float("nan")
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float("nan")


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    cpu = sum(run["cpu"] for run in runs)
    return {
        "rps": median(runs, "rps"),
        "p50": statistics.median(latency_ms(run["p50"]) for run in runs),
        "p99": statistics.median(latency_ms(run["p99"]) for run in runs),
        "per_cpu": sum(run["requests"] for run in runs) / cpu if cpu > 0 else float("nan"),
        "non2xx": sum(run["non2xx"] for run in runs),
    }


def table_lines(proxies: dict[str, Target], floor: Target, rows: list[tuple[str, str, str, str | None]]) -> list[str]:
    lines = [
        "| scenario | proxy req/s | p50 | p99 | req/CPU-s | raw ASGI floor req/s | p50 | p99 | req/CPU-s "
        "| share of the floor | Rust proxy README |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, profile, _, rust in rows:
        ours = summary(proxies[profile].runs[label])
        top = summary(floor.runs[label])
        errors = f" ({ours['non2xx'] + top['non2xx']:.0f} non-2xx!)" if ours["non2xx"] or top["non2xx"] else ""
        lines.append(
            f"| {label}{errors} | {ours['rps']:,.0f} | {ours['p50']:.2f} ms | {ours['p99']:.2f} ms "
            f"| {ours['per_cpu']:,.0f} | {top['rps']:,.0f} | {top['p50']:.2f} ms | {top['p99']:.2f} ms "
            f"| {top['per_cpu']:,.0f} | {ours['rps'] / top['rps']:.0%} "
            f"| {f'{RUST_README[rust]:,}' if rust else '–'} |"
        )
    return lines


def floor_lines(floors: dict[str, Target]) -> list[str]:
    """The floors side by side: fixed bytes from a raw ASGI callable, BlackSheep and RSGI."""
    lines = [
        "| floor (fixed 2,200 bytes) | GET req/s | p50 | p99 | req/CPU-s | POST req/s | p50 | p99 | req/CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, target in floors.items():
        cells = []
        for method, _ in FLOOR_ROWS:
            got = summary(target.runs[method])
            cells.append(
                f"{got['rps']:,.0f} | {got['p50']:.2f} ms | {got['p99']:.2f} ms | {got['per_cpu']:,.0f}"
                + (f" ({got['non2xx']:.0f} non-2xx!)" if got["non2xx"] else "")
            )
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def header(args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "n/a",
    )
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("granian", "blacksheep", "orjson", "flagsmith-flag-engine")
    )
    return (
        f"\n## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit.stdout.strip()}"
        f"{' (uncommitted changes)' if dirty.stdout.strip() else ''}\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model}), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; {packages}.\n"
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`.\n"
        f"Method: wrk -t1 -c{args.connections} -d{args.duration}s --latency pinned to CPU {WRK_CPU}; each server "
        f"one Granian worker, all its processes pinned to CPU {SERVER_CPU}; {args.rounds} interleaved round(s), "
        f"medians of req/s and latency, req/CPU-s over all rounds (server CPU time from /proc). The floors are "
        f"benchmarks/ceiling.py (fixed 2,200-byte body; POST reads the body first); the share is the proxy's "
        f"req/s over the raw-ASGI floor's for the same wrk command. Rust proxy: its README's figures (1 CPU, "
        f"50 features), not measured here.\n\n"
    )


def run_table(args: argparse.Namespace, output: Path) -> int:
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-proxy-wrk-table-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = [row for row in ROWS if row[2] in args.scenarios]
    upstreams = {
        "default": FakeFlagsmith(conformance_documents()).start(),
        "heavy": FakeFlagsmith({**conformance_documents(), "ser.env_server_key_1": heavy_document()}).start(),
    }
    started: list[ProxyProcess] = []
    floor_processes: list[subprocess.Popen[bytes]] = []
    try:
        proxies = {}
        for profile, upstream in upstreams.items():
            proxy = ProxyProcess(tmp / profile, proxy_config(upstream.api_url), workers=1).start()
            started.append(proxy)
            proxy.wait_ready()
            proxies[profile] = Target(f"proxy ({profile})", proxy.url, proxy.pid)
        floors = {}
        for app in APPS:
            process, floors[app] = start_floor(tmp, app)
            floor_processes.append(process)
        for target in [*proxies.values(), *floors.values()]:
            target.pin()
        time.sleep(1)  # let start-up work (first polls, state builds) settle
        for round_number in range(args.rounds):
            for label, profile, scenario, _ in rows:
                pair = [proxies[profile], floors["raw"]]
                if round_number % 2:
                    pair.reverse()
                for target in pair:
                    measure(target, label, scenario, args, warm=round_number == 0)
                print(f"round {round_number + 1}/{args.rounds}: {label} done", flush=True)
            for method, scenario in FLOOR_ROWS:
                for target in floors.values():
                    measure(target, method, scenario, args, warm=round_number == 0)
            print(f"round {round_number + 1}/{args.rounds}: floors done", flush=True)
        lines = [*table_lines(proxies, floors["raw"], rows), "", *floor_lines(floors)]
    finally:
        for process in floor_processes:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for proxy in started:
            proxy.stop()
        for upstream in upstreams.values():
            upstream.stop()
    print("\n".join(lines))
    with open(output, "a") as out:
        out.write(header(args) + "\n".join(lines) + "\n")
    print(f"appended to {output}")
    return 0
