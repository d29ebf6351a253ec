"""The deployment files parse, and every setting they pass exists in that process's settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from quiver.backend.settings import BackendSettings
from quiver.gateway.settings import GatewaySettings
from quiver.registry.settings import Settings as RegistrySettings
from quiver.routing.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS = {"registry": RegistrySettings, "router": RouterSettings, "gateway": GatewaySettings,
            "backend": BackendSettings}
ALL_FIELDS = set().union(*(cls.model_fields for cls in SETTINGS.values()))


def component_of(name: str) -> str:
    for comp in SETTINGS:
        if name.startswith(comp):
            return comp
    raise AssertionError(f"unknown component {name!r}")


def quiver_keys(env) -> set[str]:
    if isinstance(env, dict):
        names = env.keys()
    else:
        names = [e["name"] for e in env or []]
    return {n for n in names if n.startswith("QUIVER_")}


def field_of(key: str) -> str:
    return key.removeprefix("QUIVER_").lower()


def test_compose_settings_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    quiver_services = {n: s for n, s in compose["services"].items()
                       if str(s.get("image", "")).startswith("quiver")}
    assert {component_of(n) for n in quiver_services} == set(SETTINGS)
    for name, svc in quiver_services.items():
        cls = SETTINGS[component_of(name)]
        for key in quiver_keys(svc.get("environment")):
            assert field_of(key) in cls.model_fields, f"{name}: {key} is not a {cls.__name__} field"
        assert svc["command"][:2] == ["serve", component_of(name)]


def test_compose_gpu_backends_and_two_gateways():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "redis"} <= set(services)
    assert sum(component_of(n) == "gateway" for n in services if n.startswith("gateway")) == 2
    for name in ("backend-1", "backend-2"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def _k8s_docs():
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_k8s_manifests_parse_and_reference_real_settings():
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    for key in config["data"]:
        assert field_of(key) in ALL_FIELDS, f"ConfigMap key {key} is no process's setting"
    secret = next(d for d in docs if d["kind"] == "Secret")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in workloads} == set(SETTINGS)
    for d in workloads:
        comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        cls = SETTINGS[comp]
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["args"][:2] == ["serve", comp]
        assert container["readinessProbe"]["httpGet"]["path"]
        assert container["resources"]["requests"]
        for env in container.get("env", []):
            if env["name"].startswith("QUIVER_"):
                assert field_of(env["name"]) in cls.model_fields, f"{comp}: {env['name']}"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secret["stringData"]
        if comp == "backend":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("Dockerfile*")),
                         ids=lambda p: p.name)
def test_dockerfiles_copy_real_paths(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^FROM ", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
    assert 'torch==2.13.0' in text or "pip install .\n" in text


def test_cli_has_the_commands_the_deployments_run():
    from typer.main import get_command

    from quiver.client.cli import app

    serve = get_command(app).commands["serve"]
    assert set(SETTINGS) <= set(serve.commands)


def test_configuration_doc_lists_every_setting():
    import subprocess
    import sys

    script = ROOT / "scripts" / "gen_config_docs.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True)
    assert result.returncode == 0, "docs/configuration.md is stale: run scripts/gen_config_docs.py"
