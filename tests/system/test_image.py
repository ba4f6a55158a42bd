"""The image's recipe without a Docker engine: the Dockerfile's own build commands run in a fresh temporary
root (the locked, hash-checked install), then the result serves as the image would run it: as uid 10001,
with the root filesystem read-only (a private mount namespace), writing only to /dev/shm.

Downloads the locked wheels from the package index (nothing is cached outside the temporary root).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.fake_upstream import FakeFlagsmith
from tests.support import KEYS, ROOT, conformance_documents, free_port, python_for, wait_for


def instructions(dockerfile: str) -> list[list[tuple[str, str]]]:
    """Stages of (instruction, arguments), continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = re.sub(r"\\\n\s*", " ", "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#")))
    for line in logical.splitlines():
        if not line.strip():
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def locked() -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", (ROOT / "requirements.lock").read_text(), re.M)
    return {name.lower().replace("_", "-"): Version(version) for name, version in pins}


def test_the_lock_pins_every_runtime_dependency_within_its_range() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {requirement.specifier}"
    lock = (ROOT / "requirements.lock").read_text()
    blocks = [block for block in re.split(r"\n(?=[a-z])", lock) if "==" in block]
    assert len(blocks) == len(pins) and all("--hash=sha256:" in block for block in blocks)


def image_user() -> list[str]:
    return str(final_stage()["USER"]).split(":")


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """The build stage's RUN commands, with / moved to a temporary root (paths as in the image)."""
    root = Path(tempfile.mkdtemp(prefix="edge-proxy-image-"))
    root.chmod(0o755)  # the image's user (10001) must read what root installed
    try:
        build, final = instructions((ROOT / "Dockerfile").read_text())
        (root / "bin").mkdir()
        (root / "bin" / "python").symlink_to(python_for(image_user()))  # the base image's `python`
        env = {"PATH": f"{root / 'bin'}:/usr/bin:/bin", "HOME": str(root), "PIP_NO_CACHE_DIR": "1"}
        workdir = root
        for instruction, arguments in build:
            if instruction == "ENV":
                env.update(dict(item.split("=", 1) for item in shlex.split(arguments)))
            elif instruction == "WORKDIR":
                workdir = root / arguments.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction == "COPY":
                *sources, destination = arguments.split()
                for source in sources:
                    target = workdir / destination if destination != "./" else workdir
                    if (ROOT / source).is_dir():
                        shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        shutil.copy(ROOT / source, target)
            elif instruction == "RUN":
                command = arguments.replace("/opt/", f"{root}/opt/").replace("/src/", f"{root}/src/")
                run = subprocess.run(
                    command, shell=True, cwd=workdir, env=env, capture_output=True, text=True, timeout=900
                )
                assert run.returncode == 0, f"RUN {arguments}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        for instruction, arguments in final:  # the runtime stage's files
            if instruction == "COPY" and not arguments.startswith("--from"):
                source, destination = arguments.split()
                (root / destination.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, root / destination.lstrip("/"))
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def final_stage() -> dict[str, object]:
    stage = instructions((ROOT / "Dockerfile").read_text())[-1]
    env: dict[str, str] = {}
    found: dict[str, object] = {"env": env}
    for instruction, arguments in stage:
        if instruction == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(arguments)))
        elif instruction in ("ENTRYPOINT", "CMD", "USER", "WORKDIR"):
            found[instruction] = json.loads(arguments) if arguments.startswith("[") else arguments
    return found


def test_the_locked_install_serves_as_uid_10001_on_a_read_only_root(image_root: Path, tmp_path: Path) -> None:
    stage = final_stage()
    env_in_image: dict[str, str] = stage["env"]  # type: ignore[assignment]
    user = image_user()
    app = image_root / str(stage["WORKDIR"]).lstrip("/")
    upstream = FakeFlagsmith(conformance_documents()).start()
    pairs = [{"server_side_key": server, "client_side_key": client} for server, client in KEYS.items()]
    (app / "config.json").write_text(json.dumps({"environment_key_pairs": pairs, "api_url": upstream.api_url}))
    port = free_port()
    env = {
        key: value.replace("$PATH", "/usr/bin:/bin").replace("/opt/", f"{image_root}/opt/")
        for key, value in env_in_image.items()
    }
    env["CONFIG_PATH"] = str(app / "config.json")
    env["EDGE_PROXY_COMMIT_SHA"] = "abc123"
    env["GRANIAN_WORKERS"] = "2"
    command = [*stage["ENTRYPOINT"], *stage["CMD"], "--host", "127.0.0.1", "--port", str(port)]  # type: ignore[misc]
    # A private mount namespace whose / is read-only (as `docker run --read-only`), then drop to the user.
    drop_to_user = 'uid=$0 gid=$1 && shift && exec setpriv --reuid $uid --regid $gid --clear-groups "$@"'
    script = f"mount -o remount,bind,ro / && {drop_to_user}"
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, *user, *command],
            cwd=app,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/proxy/health/readiness", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, 60, 0.2), log.read_text()
        flags = httpx.get(url + "/api/v1/flags/", headers={"X-Environment-Key": "env_client_key_1"}, timeout=5)
        assert flags.status_code == 200 and flags.json()
        # the HEALTHCHECK's command, from the installed package
        health = subprocess.run(
            [f"{image_root}/opt/edge-proxy/bin/edge-proxy", "health", "--url", url + "/proxy/health/readiness"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert health.returncode == 0 and json.loads(health.stdout)["status"] == "ok", health.stdout + health.stderr
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'flagsmith_build_info{ci_commit_sha="abc123",version="0.1.0"} 1.0' in metrics
        assert Path(f"/dev/shm/edge-proxy.{port}").stat().st_uid == int(user[0])  # the area, by the image's user
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait(10)
        upstream.stop()
    assert code == 0, log.read_text()
    assert "Read-only file system" not in log.read_text()
    assert not Path(f"/dev/shm/edge-proxy.{port}").exists()


def test_the_image_workflow_builds_both_architectures_on_tags() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert triggers["push"]["tags"] == ["v*"]
    steps = workflow["jobs"]["image"]["steps"]
    uses = [step.get("uses", "").split("@")[0] for step in steps]
    assert {"docker/setup-qemu-action", "docker/setup-buildx-action", "docker/build-push-action"} <= set(uses)
    build = next(step for step in steps if step.get("uses", "").startswith("docker/build-push-action"))
    assert set(build["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["with"]["push"] is True
    assert "VCS_REF=${{ github.sha }}" in build["with"]["build-args"]
