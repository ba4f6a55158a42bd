"""The shipped deployment files agree with the code: probe paths exist, the config path and port match."""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.app import ROUTES

ROOT = Path(__file__).parents[1]


def test_kubernetes_manifest_points_at_real_routes() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    kinds = {document["kind"] for document in documents}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"} <= kinds
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/proxy/health/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/proxy/health/liveness"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in ROUTES
    assert container["ports"][0]["containerPort"] == 8000
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    monitor = next(d for d in documents if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] in ROUTES


def test_dockerfile_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["edge-proxy", "serve"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and '"edge-proxy", "health"' in dockerfile
    assert "USER nobody" in dockerfile
