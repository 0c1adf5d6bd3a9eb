"""The Helm chart as the tests see it: rendered by Helm's own engine (helm-python-sdk,
no helm binary, no cluster), split into manifests, and read the way the kubelet would."""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "loyalty"
DASHBOARDS = CHART / "dashboards"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
RELEASE = "ci"
NAMESPACE = "loyalty"

# The deployment profiles, then the combinations chart-testing installs (ci/*-values.yaml).
PROFILES: dict[str, Path | None] = {
    "default": None,
    "ci": CHART / "values-ci.yaml",
    "production": CHART / "values-production.yaml",
    **{f"ci/{path.name}": path for path in sorted((CHART / "ci").glob("*-values.yaml"))},
}
SERVICES = ("gateway", "members", "accounts", "rules", "rewards", "notifications")
POD_KINDS = ("Deployment", "StatefulSet", "Job", "Pod")
MONITORING_API = "monitoring.coreos.com/v1"


@dataclass(frozen=True)
class Manifest:
    """One rendered Kubernetes object and the template it came from."""

    template: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.body["metadata"].get("labels") or {})

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.body["metadata"].get("annotations") or {})

    @property
    def is_hook(self) -> bool:
        return "helm.sh/hook" in self.annotations

    @property
    def pod_spec(self) -> dict[str, Any]:
        if self.kind == "Pod":
            spec: dict[str, Any] = self.body["spec"]
            return spec
        template_spec: dict[str, Any] = self.body["spec"]["template"]["spec"]
        return template_spec

    def containers(self) -> Iterator[dict[str, Any]]:
        """Every container of a pod-bearing object, init containers first."""
        spec = self.pod_spec
        yield from spec.get("initContainers") or []
        yield from spec.get("containers") or []


def values_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Values layered as `helm -f base -f override` layers them (maps merge, the rest replaces)."""
    result = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def render(values: Mapping[str, Any] | None = None, *, upgrade: bool = False) -> list[Manifest]:
    """Renders the chart as `helm install` (or upgrade) would, hooks and test pods included."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(
            dict(values or {}),
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not upgrade,
            is_upgrade=upgrade,
        )
    manifests = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for body in yaml.safe_load_all(text):
            if body:
                manifests.append(Manifest(template, body))
    return manifests


@functools.cache
def _render_profile(profile: str) -> tuple[Manifest, ...]:
    return tuple(render(values_file(PROFILES[profile])))


def render_profile(profile: str) -> list[Manifest]:
    """The manifests of one profile (rendered once per test session)."""
    return copy.deepcopy(list(_render_profile(profile)))


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [m for m in manifests if m.kind == kind and (name is None or m.name == name)]


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(manifest: Manifest) -> str:
    return manifest.labels.get("app.kubernetes.io/component", "")


def resource_name(service: str) -> str:
    return f"{RELEASE}-loyalty-{service}"


def secret_data(secret: Manifest) -> dict[str, str]:
    data = {key: base64.b64decode(value).decode() for key, value in (secret.body.get("data") or {}).items()}
    data.update(secret.body.get("stringData") or {})
    return data


def container_env(
    manifests: list[Manifest], container: Mapping[str, Any], pod_name: str, *, secrets: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the kubelet would give a container, from the rendered ConfigMaps
    and Secrets; `secrets` supplies the keys of Secrets the chart does not render
    (secrets.existingSecret). A reference that cannot be resolved fails the test."""
    config_maps = {m.name: dict(m.body.get("data") or {}) for m in find(manifests, "ConfigMap")}
    rendered_secrets = {m.name: secret_data(m) for m in find(manifests, "Secret")}

    def secret_key(ref: Mapping[str, Any]) -> str | None:
        source = rendered_secrets.get(ref["name"])
        if source is None and secrets is not None:
            source = dict(secrets)
        assert source is not None, f"Secret {ref['name']} is not rendered"
        if ref["key"] not in source:
            assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}"
            return None
        return source[ref["key"]]

    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        else:
            env.update(rendered_secrets[source["secretRef"]["name"]])
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"]
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            env[entry["name"]] = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE}[path]
        elif "secretKeyRef" in ref:
            value = secret_key(ref["secretKeyRef"])
            if value is not None:
                env[entry["name"]] = value
        else:
            env[entry["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
    return env


# --- PromQL in dashboards and rules ---------------------------------------------------------

_GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)|\$\{__(rate_interval|interval|range)\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)\s*$", re.DOTALL)


def parse_promql(expr: str) -> promql_parser.Expr:
    """Parses a PromQL expression; Grafana's interval variables become a plain duration
    (the other variables only ever stand inside label matchers' quoted values)."""
    return promql_parser.parse(_GRAFANA_INTERVALS.sub("5m", expr))


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: every vector selector's name, wherever it
    stands among functions, aggregations, operators and subqueries."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)
        return True

    promql_parser.walk(parse_promql(expr), visit)
    return names


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def dashboard_panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # collapsed rows


def dashboard_queries(board: Mapping[str, Any]) -> Iterator[str]:
    """Every PromQL expression of a dashboard: panel targets and the selectors of query variables."""
    for panel in dashboard_panels(board):
        for target in panel.get("targets") or []:
            yield target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query)
        assert match and match["selector"], f"variable {variable['name']}: use label_values(<metric>, <label>)"
        yield match["selector"]


def rule_groups(manifests: list[Manifest]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for rule in find(manifests, "PrometheusRule"):
        groups.extend(rule.body["spec"]["groups"])
    return groups
