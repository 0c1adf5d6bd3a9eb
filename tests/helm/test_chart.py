"""The chart, proved without a cluster: Helm's own engine lints and renders it with every
profile, every manifest validates against the Kubernetes schemas, and the policies an SRE
would check by hand (resources, probes, non-root, read-only root, labels, hooks, network
policies, disruption budgets) hold for every object."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.helm.chart import (
    CHART,
    MONITORING_API,
    NAMESPACE,
    POD_KINDS,
    PROFILES,
    RELEASE,
    SERVICES,
    Manifest,
    component,
    container_env,
    find,
    merged,
    one,
    render,
    render_profile,
    resource_name,
    secret_data,
    values_file,
)

CHART_METADATA = yaml.safe_load((CHART / "Chart.yaml").read_text())
# The oldest Kubernetes the chart supports (its kubeVersion) and the newest schemas there are.
OLDEST_KUBERNETES = re.search(r"(\d+\.\d+\.\d+)", CHART_METADATA["kubeVersion"]).group(1)  # type: ignore[union-attr]
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
)
# Who dials whom in the code (services/gateway/peers.py; rewards joins with coupons at the
# till), and the `helm test` pod, which seeds the demo program and sends a receipt.
CALLERS = {
    "gateway": set(),
    "members": {"gateway"},
    "accounts": {"gateway", "rules", "members"},
    "rules": {"gateway"},
    "rewards": {"gateway", "rules"},
    "notifications": set(),
}
SMOKE_TEST_CALLS = {"gateway", "members", "rules", "rewards"}

profiles = pytest.mark.parametrize("profile", list(PROFILES))


@profiles
def test_helm_lint_is_clean(profile: str) -> None:
    report = helm.lint(
        CHART, values_file(PROFILES[profile]), strict=True, namespace=NAMESPACE, kube_version=f"v{OLDEST_KUBERNETES}"
    )
    findings = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [] and findings == [], report


@profiles
@pytest.mark.parametrize("kubernetes", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(profile: str, kubernetes: str) -> None:
    manifests = render_profile(profile)
    assert manifests
    for manifest in manifests:
        if manifest.body["apiVersion"] == MONITORING_API:
            # prometheus-operator's CRDs are not Kubernetes schemas; test_observability checks these.
            assert manifest.kind in {"ServiceMonitor", "PrometheusRule"}
            continue
        try:
            kubernetes_validate.validate(manifest.body, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{manifest.template}: {manifest.kind} {manifest.name}: {error.message}") from None


@profiles
def test_every_container_has_resources_probes_non_root_and_a_read_only_root(profile: str) -> None:
    for manifest in render_profile(profile):
        if manifest.kind not in POD_KINDS:
            continue
        pod = manifest.pod_spec
        where = f"{manifest.kind} {manifest.name}"
        assert pod.get("automountServiceAccountToken") is False, f"{where} mounts an API token it never uses"
        assert pod["securityContext"].get("runAsNonRoot") is True, where
        assert pod["securityContext"].get("runAsUser", 0) != 0, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in manifest.containers():
            at = f"{where}, container {container['name']}"
            resources = container.get("resources") or {}
            assert resources.get("requests", {}).keys() >= {"cpu", "memory"}, f"{at}: requests"
            assert "memory" in resources.get("limits", {}), f"{at}: memory limit"
            security = container.get("securityContext") or {}
            assert security.get("readOnlyRootFilesystem") is True, f"{at}: writable root filesystem"
            assert security.get("allowPrivilegeEscalation") is False, f"{at}: privilege escalation"
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{at}: capabilities"
            assert security.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0, f"{at}: root"
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image), f"{at}: untagged image {image}"
            assert not image.endswith(":latest"), f"{at}: {image}"
            if manifest.kind in ("Deployment", "StatefulSet"):
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in container, f"{at}: no {probe}"


@profiles
def test_services_are_probed_natively_over_grpc_health_on_their_grpc_port(profile: str) -> None:
    manifests = render_profile(profile)
    deployments = [m for m in find(manifests, "Deployment") if component(m) in SERVICES]
    assert deployments
    for deployment in deployments:
        (container,) = deployment.pod_spec["containers"]
        assert container["command"] == ["loyalty", "serve", component(deployment)]
        grpc_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port}, f"{deployment.name} {probe}"


@profiles
def test_every_resource_carries_the_standard_labels(profile: str) -> None:
    for manifest in render_profile(profile):
        missing = [label for label in STANDARD_LABELS if label not in manifest.labels]
        assert not missing, f"{manifest.kind} {manifest.name} lacks {missing}"
        assert manifest.labels["app.kubernetes.io/instance"] == RELEASE
        assert manifest.body["metadata"].get("namespace") in (NAMESPACE, "monitoring"), manifest.name
        if manifest.kind in ("Deployment", "StatefulSet"):
            selector = manifest.body["spec"]["selector"]["matchLabels"]
            pod_labels = manifest.body["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= pod_labels.items(), manifest.name
            assert "app.kubernetes.io/version" not in selector, "a selector must survive upgrades"


def _undocumented_keys(path: Path) -> list[str]:
    """Keys of a values file without a comment directly above that starts with the key's
    name. Entries of lists (Kubernetes objects such as NetworkPolicy peers) are not keys."""
    undocumented = []
    comments: list[str] = []
    list_indent: int | None = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            comments = []
            continue
        if stripped.startswith("#"):
            comments.append(stripped)
            continue
        indent = len(line) - len(line.lstrip())
        if list_indent is not None and indent > list_indent:
            comments = []
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
        elif match := re.match(r"([\w./-]+):", stripped):
            key = match[1]
            if not comments or not re.match(rf"#+ {re.escape(key)}\b", comments[0]):
                undocumented.append(f"{path.name}:{number}: {key}")
        comments = []
    return undocumented


@pytest.mark.parametrize(
    "path", [CHART / "values.yaml", *(path for path in PROFILES.values() if path)], ids=lambda path: path.name
)
def test_values_files_document_every_key_by_a_comment_that_starts_with_its_name(path: Path) -> None:
    assert _undocumented_keys(path) == []


def test_the_documentation_check_finds_an_undocumented_key(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("# image is documented\nimage:\n  # the tag, but not by its name\n  tag: x\n")
    assert _undocumented_keys(values) == ["values.yaml:4: tag"]


def test_values_keep_services_and_settings_as_maps_not_lists() -> None:
    values = values_file(CHART / "values.yaml")
    assert set(values["services"]) == set(SERVICES)
    assert isinstance(values["serviceDefaults"]["env"], dict) and isinstance(values["config"]["extraEnv"], dict)


def _budgets(manifests: list[Manifest]) -> set[str]:
    return {component(m) for m in find(manifests, "PodDisruptionBudget")}


def test_disruption_budgets_exist_only_where_a_replica_can_be_spared() -> None:
    assert _budgets(render_profile("default")) == set(SERVICES), "two replicas each by default"
    assert _budgets(render_profile("ci")) == set(), "one replica each: a budget would block node drains"
    one_gateway = render({"services": {"gateway": {"replicas": 1}}})
    assert _budgets(one_gateway) == set(SERVICES) - {"gateway"}
    autoscaled = render({"services": {"gateway": {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 2}}}})
    assert "gateway" in _budgets(autoscaled), "the autoscaler keeps two"
    assert _budgets(render({"serviceDefaults": {"podDisruptionBudget": {"enabled": False}}})) == set()


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler() -> None:
    manifests = render_profile("production")
    autoscalers = {m.body["spec"]["scaleTargetRef"]["name"]: m for m in find(manifests, "HorizontalPodAutoscaler")}
    assert set(autoscalers) == {resource_name(name) for name in SERVICES}
    for deployment in find(manifests, "Deployment"):
        assert "replicas" not in deployment.body["spec"], deployment.name
        assert autoscalers[deployment.name].body["spec"]["minReplicas"] == 3
    with pytest.raises(helm.HelmRenderError, match="minReplicas exceeds maxReplicas"):
        render({"serviceDefaults": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})


def test_a_service_can_be_switched_off_with_everything_it_owns() -> None:
    manifests = render({"services": {"notifications": {"enabled": False}}})
    assert not [m for m in manifests if component(m) == "notifications"]
    config = one(manifests, "ConfigMap", resource_name("config")).body["data"]
    assert not [key for key in config if key.startswith("LOYALTY_NOTIFICATIONS__")]
    assert "notifications-database-url" not in secret_data(one(manifests, "Secret", f"{RELEASE}-loyalty"))
    assert len(find(manifests, "Job")) == len(SERVICES) - 1


def _hook(manifest: Manifest) -> tuple[str, int]:
    return manifest.annotations["helm.sh/hook"], int(manifest.annotations.get("helm.sh/hook-weight", "0"))


@pytest.mark.parametrize(
    ("profile", "phases"),
    [
        ("default", "pre-install,pre-upgrade"),
        ("production", "pre-install,pre-upgrade"),
        ("ci", "post-install,pre-upgrade"),
    ],
)
def test_migrations_run_as_hook_jobs_before_the_deployments_change(profile: str, phases: str) -> None:
    manifests = render_profile(profile)
    values = merged(values_file(CHART / "values.yaml"), values_file(PROFILES[profile]))
    jobs = find(manifests, "Job")
    assert sorted(job.pod_spec["containers"][0]["command"][-1] for job in jobs) == sorted(SERVICES)
    hooks = {(m.kind, m.name): m for m in manifests if m.is_hook and m.kind != "Pod"}
    for job in jobs:
        phase, weight = _hook(job)
        assert phase == phases
        assert "hook-succeeded" in job.annotations["helm.sh/hook-delete-policy"]
        spec = job.pod_spec
        assert spec["restartPolicy"] == "Never"
        # Everything a hook Job uses must exist before it: hooks of a lower weight, or a
        # Secret managed outside the chart.
        account = hooks[("ServiceAccount", spec["serviceAccountName"])]
        assert _hook(account) == (phases, _hook(account)[1]) and _hook(account)[1] < weight
        (container,) = spec["containers"]
        service = container["command"][-1]
        assert container["command"] == ["loyalty", "migrate", service]
        refs = [entry["valueFrom"]["secretKeyRef"] for entry in container["env"] if "valueFrom" in entry]
        assert [ref["key"] for ref in refs] == [f"{service}-database-url"]
        if values["secrets"]["existingSecret"]:
            assert refs[0]["name"] == values["secrets"]["existingSecret"]
        else:
            secret = hooks[("Secret", refs[0]["name"])]
            assert _hook(secret)[0] == phases and _hook(account)[1] < _hook(secret)[1] < weight
            env = container_env(manifests, container, pod_name=f"{job.name}-x")
            assert env[f"LOYALTY_{service.upper()}__DATABASE_URL"].startswith("postgresql+asyncpg://")
    config = one(manifests, "ConfigMap", resource_name("config")).body["data"]
    assert config["LOYALTY_AUTO_MIGRATE"] == "false", "the Jobs migrate, not the services"


def test_without_migration_jobs_the_services_migrate_themselves() -> None:
    manifests = render_profile("ci/existing-secret-values.yaml")
    assert find(manifests, "Job") == []
    assert one(manifests, "ConfigMap", resource_name("config")).body["data"]["LOYALTY_AUTO_MIGRATE"] == "true"


def _admitted(policy: Manifest, port: str) -> set[str] | None:
    """The components a NetworkPolicy admits on a port; None when it admits anyone."""
    admitted: set[str] = set()
    for rule in policy.body["spec"]["ingress"]:
        if port not in {entry["port"] for entry in rule["ports"]}:
            continue
        if "from" not in rule:
            return None
        for peer in rule["from"]:
            selector = peer["podSelector"]
            assert selector["matchLabels"] == {
                "app.kubernetes.io/name": "loyalty",
                "app.kubernetes.io/instance": RELEASE,
            }
            (expression,) = selector["matchExpressions"]
            assert (expression["key"], expression["operator"]) == ("app.kubernetes.io/component", "In")
            admitted.update(expression["values"])
    return admitted


@pytest.mark.parametrize("profile", ["default", "ci"])
def test_network_policies_admit_each_service_only_from_its_callers(profile: str) -> None:
    manifests = render_profile(profile)
    tests_enabled = bool(find(manifests, "Pod"))
    for service in SERVICES:
        policy = one(manifests, "NetworkPolicy", resource_name(service))
        assert policy.body["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == service
        expected = CALLERS[service] | ({"smoke-test"} if tests_enabled and service in SMOKE_TEST_CALLS else set())
        admitted = _admitted(policy, "grpc")
        if service == "gateway":
            assert admitted is None, "clients reach the gateway from outside"
        else:
            assert admitted == expected, service
    for pod in find(manifests, "Pod"):
        assert component(pod) == "smoke-test"


def test_production_admits_clients_to_the_gateway_only_through_the_ingress_controller() -> None:
    manifests = render_profile("production")
    gateway = one(manifests, "NetworkPolicy", resource_name("gateway"))
    outside = [rule for rule in gateway.body["spec"]["ingress"] if "grpc" in {p["port"] for p in rule["ports"]}]
    assert [rule["from"] for rule in outside] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    ]
    for service in set(SERVICES) - {"gateway"}:
        assert _admitted(one(manifests, "NetworkPolicy", resource_name(service)), "grpc") == CALLERS[service]


@profiles
def test_each_service_reads_only_its_own_database_and_every_reference_resolves(profile: str) -> None:
    manifests = render_profile(profile)
    values = merged(values_file(CHART / "values.yaml"), values_file(PROFILES[profile]))
    existing = values["secrets"]["existingSecret"]
    outside_secret = {f"{name}-database-url": "postgresql+asyncpg://x@db/x" for name in SERVICES} | {
        "redis-url": "redis://redis:6379/0",
        **{f"provider-token-{p}": "token" for p in values["secrets"]["providerTokens"]},
    }
    for deployment in find(manifests, "Deployment"):
        service = component(deployment)
        if service not in SERVICES:
            continue
        (container,) = deployment.pod_spec["containers"]
        databases = {entry["name"] for entry in container["env"] if entry["name"].endswith("__DATABASE_URL")}
        assert databases == {f"LOYALTY_{service.upper()}__DATABASE_URL"}
        env = container_env(manifests, container, f"{deployment.name}-0", secrets=outside_secret if existing else None)
        assert env["LOYALTY_EVENT_BUS"] == "redis" and env["LOYALTY_BIND_HOST"] == "0.0.0.0"
        assert env["LOYALTY_INSTANCE_NAME"] == f"{deployment.name}-0", "the pod's name"
        assert env[f"LOYALTY_{service.upper()}__PORT"] == str(
            next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        )
        assert env["LOYALTY_REDIS_URL"].startswith(("redis://", "rediss://"))
        for peer in CALLERS:
            if f"LOYALTY_{peer.upper()}__ADDRESS" in env:
                assert (
                    env[f"LOYALTY_{peer.upper()}__ADDRESS"]
                    == f"{resource_name(peer)}:{values['services'][peer]['port']}"
                )


def test_existing_secret_replaces_the_rendered_credentials() -> None:
    manifests = render_profile("production")
    assert find(manifests, "Secret") == []
    notifications = one(manifests, "Deployment", resource_name("notifications"))
    refs = {
        entry["name"]: entry["valueFrom"]["secretKeyRef"]
        for entry in notifications.pod_spec["containers"][0]["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert {ref["name"] for ref in refs.values()} == {"loyalty-credentials"}
    assert refs["LOYALTY_PROVIDER_TOKENS__SMS"]["key"] == "provider-token-sms"
    assert refs["LOYALTY_PROVIDER_TOKENS__EMAIL"]["key"] == "provider-token-email"


def test_the_rendered_secret_builds_each_database_url_from_the_external_database() -> None:
    manifests = render(
        {
            "externalDatabase": {"host": "pg.internal", "password": "p@ss/word", "options": "ssl=require"},
            "externalRedis": {"host": "redis.internal", "password": "r:pw", "tls": True, "database": 2},
            "secrets": {"apiKeyPepper": "pepper", "providerTokens": {"sms": "t0ken"}},
        }
    )
    data = secret_data(one(manifests, "Secret", f"{RELEASE}-loyalty"))
    assert data["members-database-url"] == (
        "postgresql+asyncpg://loyalty:p%40ss%2Fword@pg.internal:5432/loyalty_members?ssl=require"
    )
    assert data["redis-url"] == "rediss://:r%3Apw@redis.internal:6379/2"
    assert (data["api-key-pepper"], data["provider-token-sms"]) == ("pepper", "t0ken")


def _pod_annotations(manifests: list[Manifest], service: str) -> dict[str, str]:
    annotations: dict[str, str] = one(manifests, "Deployment", resource_name(service)).body["spec"]["template"][
        "metadata"
    ]["annotations"]
    return annotations


def test_config_and_secret_changes_roll_the_pods() -> None:
    before = _pod_annotations(render(), "rules")
    config_changed = _pod_annotations(render({"config": {"logLevel": "DEBUG"}}), "rules")
    secret_changed = _pod_annotations(render({"externalDatabase": {"password": "rotated"}}), "rules")
    assert config_changed["checksum/config"] != before["checksum/config"]
    assert config_changed["checksum/secret"] == before["checksum/secret"]
    assert secret_changed["checksum/secret"] != before["checksum/secret"]


def test_an_unpinned_image_or_a_bundled_database_without_password_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="latest"):
        render({"image": {"tag": "latest"}})
    with pytest.raises(helm.HelmRenderError, match=r"postgresql\.auth\.password is required"):
        render({"postgresql": {"enabled": True}})
    pinned = render({"image": {"digest": "sha256:" + "a" * 64}})
    images = {c["image"] for m in pinned if m.kind in POD_KINDS for c in m.containers()}
    assert images == {"ghcr.io/loyalty-platform/loyalty@sha256:" + "a" * 64}


def test_the_bundled_postgresql_creates_every_database_the_services_use() -> None:
    manifests = render_profile("ci")
    initdb = one(manifests, "ConfigMap", resource_name("postgresql-initdb")).body["data"]["10-databases.sql"]
    created = set(re.findall(r'CREATE DATABASE "(\w+)"', initdb))
    urls = secret_data(one(manifests, "Secret", f"{RELEASE}-loyalty"))
    used = {urls[f"{name}-database-url"].rsplit("/", 1)[1] for name in SERVICES}
    assert used == created == {f"loyalty_{name}" for name in SERVICES}
    assert urls["redis-url"] == f"redis://{resource_name('redis')}:6379/0"
    for name in SERVICES:
        assert f"@{resource_name('postgresql')}:5432/" in urls[f"{name}-database-url"]


def test_the_smoke_test_pod_seeds_the_demo_then_sends_a_receipt_through_the_gateway() -> None:
    manifests = render_profile("ci")
    (pod,) = find(manifests, "Pod")
    assert pod.annotations["helm.sh/hook"] == "test"
    assert pod.pod_spec["restartPolicy"] == "Never"
    (seed,) = pod.pod_spec["initContainers"]
    (receipt,) = pod.pod_spec["containers"]
    assert seed["command"] == ["loyalty", "seed-demo"]
    assert receipt["command"][:2] == ["loyalty", "demo-receipt"]
    env = container_env(manifests, receipt, pod.name)
    assert env["LOYALTY_GATEWAY__ADDRESS"] == f"{resource_name('gateway')}:50051"
    assert find(render_profile("production"), "Pod") == [], "production never seeds demo data"


def test_the_otlp_endpoint_reaches_every_service() -> None:
    manifests = render({"config": {"otlpEndpoint": "http://collector:4317"}})
    assert one(manifests, "ConfigMap", resource_name("config")).body["data"]["LOYALTY_OTLP_ENDPOINT"] == (
        "http://collector:4317"
    )
    assert "LOYALTY_OTLP_ENDPOINT" not in one(render(), "ConfigMap", resource_name("config")).body["data"]


def test_an_upgrade_renders_the_same_objects_as_an_install() -> None:
    def identity(manifests: list[Manifest]) -> list[tuple[str, str]]:
        return sorted((m.kind, m.name) for m in manifests)

    assert identity(render(values_file(PROFILES["ci"]), upgrade=True)) == identity(render_profile("ci"))


def _pod_bearing(manifests: list[Manifest]) -> dict[str, Any]:
    return {m.name: m for m in manifests if m.kind in POD_KINDS}


def test_every_service_account_a_pod_names_is_rendered_or_the_default() -> None:
    for profile in PROFILES:
        manifests = render_profile(profile)
        accounts = {m.name for m in find(manifests, "ServiceAccount")}
        for name, manifest in _pod_bearing(manifests).items():
            account = manifest.pod_spec.get("serviceAccountName", "default")
            assert account in accounts | {"default"}, f"{profile}: {name} runs as {account}"
