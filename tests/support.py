"""Test helpers: real `edge-proxy serve` processes (bounded waits, always stopped), the fake upstream's
documents, free ports, process inspection through /proc. Imported by tests, by `conftest.py`'s fixtures
and by the benchmark scripts (`python -m benchmarks.x` from the repository root)."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from packaging.requirements import Requirement

from tests.fake_upstream import FakeFlagsmith

TESTS = Path(__file__).parent  # the tiers live in subfolders; paths start here, not at a test file
ROOT = TESTS.parent
DATA = TESTS / "data"
EXAMPLES = DATA / "ep-examples"
ENGINE_DATA = DATA / "engine-test-data"
EDGE_PROXY = str(Path(sys.executable).parent / "edge-proxy")

KEYS = {
    "ser.env_server_key_1": "env_client_key_1",
    "ser.env_server_key_2": "env_client_key_2",
}


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def conformance_documents() -> dict[str, dict[str, Any]]:
    return {
        "ser.env_server_key_1": load_json(EXAMPLES / "upstream_env1_document.json"),
        "ser.env_server_key_2": load_json(EXAMPLES / "upstream_env2_document.json"),
    }


# Ports handed out by this test process: never the same one twice, even once its socket is closed.
_handed_out: set[int] = set()
# How often a proxy is restarted on a fresh port when another process took its port between `free_port`
# and Granian's bind (two cores, several engineers' test runs at once).
START_RETRIES = 3


def free_port(attempts: int = 20) -> int:
    """A port nobody listens on now (the kernel's pick), not handed out before; retries on EADDRINUSE."""
    for _ in range(attempts):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 0))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 after {attempts} attempts")


def lost_the_port(log: str) -> bool:
    """Did a start-up fail because another process bound our port first?"""
    text = log.lower()
    return "address already in use" in text or "os error 98" in text or "errno 98" in text


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command may contain spaces and parentheses: fields follow the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ProxyProcess:
    """`edge-proxy serve` in its own working directory, as a user would start it."""

    def __init__(self, workdir: Path, config: dict[str, Any], workers: int = 1, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config))
        self.log_path = workdir / "proxy.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GRANIAN_", "PROMETHEUS_"))},
            "CONFIG_PATH": str(workdir / "config.json"),
            **(env or {}),
        }
        self.workers = workers
        self.start_retries = START_RETRIES
        self._log_start = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.upstream: FakeFlagsmith | None = None  # set by `serving`

    def start(self) -> ProxyProcess:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0  # this attempt's output
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    EDGE_PROXY,
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as in a terminal (see the Ctrl-C test)
            )
        return self

    def _restart_on_a_new_port(self) -> None:
        self.start_retries -= 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n[tests] port {self.port} was taken by another process; retrying on a new port\n".encode())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def area(self) -> Path:
        return Path("/dev/shm") / f"edge-proxy.{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def status_of(self, path: str) -> int | None:
        """One GET on a fresh connection (http.client: httpx.get builds a client and TLS context each
        call, ~30 ms); None when the connection fails."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def wait_live(self, timeout: float = 30) -> None:
        def live() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                if self.start_retries > 0 and lost_the_port(self.log()[self._log_start :]):
                    self._restart_on_a_new_port()
                    return False
                raise AssertionError(f"proxy exited with {self.process.returncode}:\n{self.log()}")
            return self.status_of("/proxy/health/liveness") == 200

        assert wait_for(live, timeout, 0.02), f"proxy not live after {timeout}s:\n{self.log()}"

    def wait_ready(self, timeout: float = 30) -> None:
        self.wait_live(timeout)
        # Each check is a fresh connection, which the kernel hands to any worker: ready only when enough
        # checks in a row pass that every worker has almost surely answered (2 workers: 1 in 500,000 not).
        in_a_row = 1 if self.workers <= 1 else 10 * self.workers
        streak = [0]

        def ready_everywhere() -> bool:
            streak[0] = streak[0] + 1 if self.status_of("/proxy/health/readiness") == 200 else 0
            return streak[0] >= in_a_row

        ready = wait_for(ready_everywhere, timeout, 0.01)
        assert ready, f"proxy not ready after {timeout}s:\n{self.log()}"

    def leader_pid(self) -> int | None:
        pids = [p for p in children(self.pid) if "spawn_main" in cmdline(p) and alive(p)]
        return pids[0] if pids else None

    def worker_pids(self) -> list[int]:
        own = cmdline(self.pid)
        return sorted(p for p in children(self.pid) if cmdline(p) == own and alive(p))

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def proxy_config(api_url: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "environment_key_pairs": [
            {"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()
        ],
        "api_url": api_url,
        "api_poll_frequency_seconds": 10,
        "api_poll_timeout_seconds": 5,
        "logging": {"log_level": "INFO"},
    }
    config.update(overrides)
    return config


@contextlib.contextmanager
def serving(
    workdir: Path, documents: dict[str, dict[str, Any]], config: Callable[[str], dict[str, Any]]
) -> Iterator[ProxyProcess]:
    """A fake upstream serving `documents` and a ready proxy configured by `config(api_url)`; both stopped after."""
    upstream = FakeFlagsmith(documents).start()
    proxy = ProxyProcess(workdir, config(upstream.api_url)).start()
    proxy.upstream = upstream
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()
        upstream.stop()


def npm_install(folder: Path, needed_for: str) -> None:
    """Install `folder`'s lock file's exact packages into its node_modules (gitignored), once."""
    assert shutil.which("npm"), f"npm is needed for {needed_for} (apt-get install nodejs npm)"
    lock = json.loads((folder / "package-lock.json").read_text())
    installed = folder / "node_modules" / ".package-lock.json"
    wanted = {name: entry["version"] for name, entry in lock["packages"].items() if name}
    if installed.exists():
        have = json.loads(installed.read_text())["packages"]
        if all(have.get(name, {}).get("version") == version for name, version in wanted.items()):
            return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=True, timeout=300)


class ClientLoop:
    """A client thread sending `GET path` over keep-alive, reconnecting after any failure, and recording
    each failure: a fault test's load, bounded by `seconds` even if the test fails before `stop()`."""

    def __init__(self, port: int, path: str, headers: dict[str, str], seconds: float, pause: float = 0) -> None:
        self.port, self.path, self.headers, self.seconds, self.pause = port, path, headers, seconds, pause
        self.failures: list[str] = []
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.seconds + 5)

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                connection.request("GET", self.path, headers=self.headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.failures.append(str(response.status))
                self.served += 1
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            if self.pause:
                time.sleep(self.pause)
        connection.close()


def python_for(user: list[str]) -> str:
    """A CPython 3.11 (the lock's) that the image's user can run whole, as the image's /usr/local one.

    An interpreter under /root (pyenv) is not: that user cannot read its standard library, and Python then
    silently falls back to another prefix.
    """
    probe = "import sys; print(sys.version_info[:2] == (3, 11), sys.base_prefix)"
    for candidate in (sys._base_executable, "/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if not Path(candidate).is_file():
            continue
        as_root = subprocess.run([candidate, "-c", probe], capture_output=True, text=True).stdout
        as_user = subprocess.run(
            ["setpriv", "--reuid", user[0], "--regid", user[1], "--clear-groups", candidate, "-c", probe],
            capture_output=True,
            text=True,
        ).stdout
        if as_root.startswith("True") and as_user == as_root:
            return candidate
    raise AssertionError("no CPython 3.11 that a non-root user can run (apt-get install python3.11-venv)")


def runtime_distributions(name: str = "edge-proxy") -> list[metadata.Distribution]:
    """The installed distributions `name` needs at run time (its requirements, recursively; no extras)."""
    found: dict[str, metadata.Distribution] = {}
    wanted = [name]
    while wanted:
        distribution = metadata.distribution(wanted.pop())
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = distribution
        for spec in distribution.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
    return [distribution for key, distribution in found.items() if key != name]


def _place(source: Path, target: Path) -> None:
    """A hard link when everyone may read the file already (the same inode: nothing to change), else a
    readable copy."""
    if source.stat().st_mode & 0o004:
        with contextlib.suppress(OSError):  # another filesystem: copied below
            os.link(source, target)
            return
    shutil.copy2(source, target)
    target.chmod(target.stat().st_mode | 0o444)


@contextlib.contextmanager
def world_readable_install(user: list[str]) -> Iterator[Path]:
    """The proxy and its runtime dependencies in a temporary venv under /tmp that `user` can read, for
    running it as that user from a checkout it cannot enter (`git clone` into `mktemp -d` is mode 0700).
    Yields the venv's python (`python -m proxy` is `edge-proxy`); removed after. Files are hard-linked
    from this venv when on the same filesystem (instant), copied otherwise."""
    root = Path(tempfile.mkdtemp(prefix="edge-proxy-runtime-"))
    try:
        root.chmod(0o755)
        subprocess.run([python_for(user), "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = root / "lib" / version / "site-packages"
        for distribution in runtime_distributions():
            for file in distribution.files or []:
                if file.parts[0] == ".." or "__pycache__" in file.parts:  # scripts in bin/, bytecode
                    continue
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                _place(Path(str(file.locate())), target)
        for source in (ROOT / "proxy").rglob("*"):
            if source.is_file() and "__pycache__" not in source.parts:
                (site / source.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                _place(source, site / source.relative_to(ROOT))
        for folder, _, _ in os.walk(root):  # ours: readable whatever the umask
            os.chmod(folder, 0o755)
        yield root / "bin" / "python"
    finally:
        shutil.rmtree(root, ignore_errors=True)
