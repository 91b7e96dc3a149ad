"""The Kubernetes manifests (packaging/kubernetes/) for a team's gateway, checked as far as
they can be without a cluster (none can run here): every object against the Kubernetes API's
own schema, strictly; LM Gate's settings in them against the settings the code declares; the
secrets only by reference; and the posture every container must have. They were not applied
to a cluster; the README says so."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO_ROOT
from tray_app.config.settings import SETTINGS, Config, load_config
from tray_app.secret_store.base import EnvSecretStore

MANIFESTS = sorted((REPO_ROOT / "packaging" / "kubernetes").glob("*.yaml"))
# The oldest release still supported upstream when these were written, and the newest the
# validator knows: the manifests must hold on both.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SECRETS_THE_REPLICAS_NEED = ("state-database-url", "state-redis-url", "jwt-signing-key")


def objects() -> list[dict[str, Any]]:
    found = []
    for path in MANIFESTS:
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objects()
        if o["kind"] in {"Deployment", "StatefulSet"}
    ]


def test_there_are_manifests_for_the_whole_shape() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects()}
    assert {("Deployment", "lmgate"), ("Ingress", "lmgate"), ("StatefulSet", "postgres")} <= kinds
    assert ("Deployment", "redis") in kinds
    assert named("Deployment", "lmgate")["spec"]["replicas"] >= 2


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_the_kubernetes_api(version: str) -> None:
    for manifest in objects():
        kubernetes_validate.validate(manifest, version, strict=True)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    # Strict validation is what catches a field Kubernetes would silently drop.
    broken = copy.deepcopy(named("Deployment", "lmgate"))
    broken["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def _gateway_env() -> dict[str, str]:
    return dict(named("ConfigMap", "lmgate-settings")["data"])


def test_the_gateways_settings_are_ones_it_declares_and_accepts(tmp_path: Path) -> None:
    env = _gateway_env()
    declared = {setting.env_var for setting in SETTINGS}
    assert set(env) <= declared, set(env) - declared
    config = load_config(path=tmp_path / "none.toml", environ=env)
    assert config.state_backend.value == "postgres"
    assert config.secrets_store.value == "env"  # the Secret's variables, nothing on disk
    assert config.server_trusted_proxies and config.server_allowed_hosts


def test_secrets_come_only_by_reference() -> None:
    text = "\n".join(path.read_text() for path in MANIFESTS)
    assert "kind: Secret" not in text, "no Secret (and so no secret value) is shipped"
    assert not re.search(
        r"(?i)(password|secret|token|key)\w*\s*[:=]\s*['\"]?[A-Za-z0-9+/]{16}", text
    )
    container = named("Deployment", "lmgate")["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "lmgate-secrets"}} in container["envFrom"]
    assert not any(e["name"].startswith(EnvSecretStore.PREFIX) for e in container.get("env", []))
    assert not any(k.startswith(EnvSecretStore.PREFIX) for k in _gateway_env())
    # The README's steps make the Secret with every variable the replicas read.
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### On Kubernetes", 1)[1].split("\n## ", 1)[0]
    for name in SECRETS_THE_REPLICAS_NEED:
        assert EnvSecretStore.variable_for(name) in section, name


@pytest.mark.parametrize("name", [name for name, _ in pod_specs()])
def test_every_container_runs_unprivileged_bounded_and_probed(name: str) -> None:
    spec = dict(pod_specs())[name]
    assert spec.get("automountServiceAccountToken") is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID")
    assert not any("hostPath" in volume for volume in spec.get("volumes", []))
    pod = spec.get("securityContext", {})
    assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        own = container.get("securityContext", {})
        assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
        assert own.get("runAsUser", pod.get("runAsUser", 0)) != 0
        assert own.get("allowPrivilegeEscalation") is False
        assert own.get("capabilities", {}).get("drop") == ["ALL"]
        assert not own.get("privileged")
        assert "memory" in container["resources"]["limits"]
        assert "readinessProbe" in container


def test_the_replicas_are_probed_and_stopped_as_the_gateway_expects() -> None:
    spec = named("Deployment", "lmgate")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"  # not the database's
    assert spec["terminationGracePeriodSeconds"] > Config().server_shutdown_grace
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    dockerfile = (REPO_ROOT / "packaging" / "Dockerfile").read_text()
    assert f"LMGATE_SERVER_PORT={container['ports'][0]['containerPort']}" in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert spec["securityContext"]["runAsUser"] == 10001


def test_the_ingress_streams_and_never_runs_a_chat_twice() -> None:
    notes = named("Ingress", "lmgate")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= 600
    # Only a request that could not be sent goes to another replica (ingress-nginx never
    # retries a POST unless told non_idempotent; a timeout would have reached LM Studio).
    assert notes[prefix + "proxy-next-upstream"] == "error"
    assert all("non_idempotent" not in value for value in notes.values())


def test_the_state_is_reachable_from_the_replicas_alone() -> None:
    policy = named("NetworkPolicy", "state")
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "lmgate"}}}]}
    ]
    redis = named("Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"] == ["/etc/redis/redis.conf"], "the password stays out of argv"
