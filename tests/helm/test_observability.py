"""Dashboards and alert rules: well-formed, shipped the way the monitoring stack loads
them, each alert with its runbook, and every metric they read exported by the suite."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loyalty.gateway.v1 import pos_service_pb2 as pos
from loyalty.gateway.v1 import pos_service_pb2_grpc as pos_grpc
from loyalty.runtime.settings import Settings
from tests import infra
from tests.e2e.scenario import receipt, set_up_program
from tests.helm.chart import (
    DASHBOARDS,
    OPERATIONS_DOC,
    SERVICES,
    component,
    dashboard_panels,
    dashboard_queries,
    dashboards,
    find,
    metric_names,
    one,
    render_profile,
    resource_name,
    rule_groups,
)

MONITORING_PROFILE = "ci/monitoring-values.yaml"
SEVERITIES = {"critical", "warning"}
# Series names per metric type, as Prometheus stores what the client library exposes.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "unknown": ("",),
    "stateset": ("",),
}


def _rules() -> list[dict[str, object]]:
    return [rule for group in rule_groups(render_profile(MONITORING_PROFILE)) for rule in group["rules"]]


def _recorded() -> set[str]:
    return {str(rule["record"]) for rule in _rules() if "record" in rule}


def used_metric_names() -> dict[str, set[str]]:
    """Every metric name a dashboard or a rule reads, and where it is read."""
    used: dict[str, set[str]] = {}
    for name, board in dashboards().items():
        for query in dashboard_queries(board):
            for metric in metric_names(query):
                used.setdefault(metric, set()).add(f"dashboards/{name}")
    for rule in _rules():
        where = f"rule {rule.get('alert') or rule.get('record')}"
        for metric in metric_names(str(rule["expr"])):
            used.setdefault(metric, set()).add(where)
    return used


def test_metric_names_are_found_through_functions_aggregations_and_operators() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{x=~"$service"}[$__rate_interval])))'
        " / on() group_left sum(increase(b_total[$__range])) > bool max_over_time(c[1h:5m]) unless absent(d)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        metric_names("sum(rate(a_total[5m])")


def test_dashboards_are_well_formed_grafana_json() -> None:
    boards = dashboards()
    assert set(boards) == {"sre-overview.json", "business.json", "pipeline.json"}
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        variables = {variable["name"] for variable in board["templating"]["list"]}
        assert {"datasource", "namespace"} <= variables, name
        panels = list(dashboard_panels(board))
        assert len({panel["id"] for panel in panels}) == len(panels), f"{name}: duplicate panel ids"
        for panel in panels:
            position = panel["gridPos"]
            assert position["x"] + position["w"] <= 24, f"{name}: {panel['title']}"
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel.get("description"), f"{name}: {panel['title']} explains nothing"
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert 'namespace="$namespace"' in target["expr"], f"{name}: {panel['title']} ignores the namespace"


def test_dashboards_cover_the_sre_business_and_pipeline_views() -> None:
    boards = dashboards()

    def read(board: str) -> set[str]:
        return {metric for query in dashboard_queries(boards[board]) for metric in metric_names(query)}

    assert read("sre-overview.json") >= {
        "loyalty_grpc_server_requests_total",
        "loyalty_grpc_server_request_duration_seconds_bucket",
        "loyalty_grpc_server_in_flight_requests",
    }
    assert read("business.json") >= {
        "loyalty_receipts_total",
        "loyalty_points_accrued_total",
        "loyalty_degraded_answers_total",
        "loyalty_rule_evaluation_seconds_bucket",
        "loyalty_points_redeemed_total",
        "loyalty_points_expired_total",
        "loyalty_points_outstanding",
        "loyalty_active_campaigns",
    }
    assert read("pipeline.json") >= {
        "loyalty_outbox_pending_events",
        "loyalty_outbox_oldest_pending_age_seconds",
        "loyalty_events_published_total",
        "loyalty_events_consumed_total",
        "loyalty_consumer_lag_seconds",
        "loyalty_saga_unfinished_receipts",
        "loyalty_job_runs_total",
    }


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar() -> None:
    manifests = render_profile(MONITORING_PROFILE)
    maps = [m for m in find(manifests, "ConfigMap") if component(m) == "dashboards"]
    assert len(maps) == len(dashboards())
    shipped = {}
    for config_map in maps:
        assert config_map.labels["grafana_dashboard"] == "1"
        assert config_map.annotations["grafana_folder"] == "Loyalty"
        ((filename, content),) = config_map.body["data"].items()
        shipped[filename] = json.loads(content)
    assert shipped == dashboards(), "the chart ships the dashboards as they are in the repository"
    assert not [m for m in find(render_profile("ci"), "ConfigMap") if component(m) == "dashboards"]
    production = [m for m in find(render_profile("production"), "ConfigMap") if component(m) == "dashboards"]
    assert {m.body["metadata"]["namespace"] for m in production} == {"monitoring"}


def test_rules_parse_and_every_alert_is_labelled_and_linked_to_its_runbook() -> None:
    rules = _rules()
    alerts = [rule for rule in rules if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= {
        "LoyaltyGrpcErrorRatioHigh",
        "LoyaltyChequeLatencyBudgetBurn",
        "LoyaltySagaBacklogGrowing",
        "LoyaltyOutboxLagging",
        "LoyaltyConsumerLagging",
        "LoyaltyJobFailing",
        "LoyaltyDegradedAnswersRising",
    }
    recorded = _recorded()
    for rule in rules:
        metric_names(str(rule["expr"]))  # parses
        if "record" in rule:
            assert re.fullmatch(r"\w+:\w+:\w+", str(rule["record"])), rule["record"]
            continue
        where = rule["alert"]
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels["severity"] in SEVERITIES, where
        assert annotations["summary"] and annotations["description"], where
        assert str(annotations["runbook_url"]).endswith(f"operations.md#{str(where).lower()}"), where
        if "for" in rule:
            promql_parser.parse_duration(str(rule["for"]))
        for metric in metric_names(str(rule["expr"])):
            assert metric.startswith("loyalty_") or metric in recorded, f"{where} reads {metric}, recorded nowhere"


def _selectors(expr: str) -> list[promql_parser.VectorSelector]:
    selectors: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors


def test_every_selector_in_the_rules_is_scoped_to_the_release_namespace() -> None:
    for rule in _rules():
        for selector in _selectors(str(rule["expr"])):
            assert 'namespace="loyalty"' in str(selector), f"{rule.get('alert') or rule.get('record')}: {selector}"


def _runbook_anchors() -> set[str]:
    """GitHub's anchors for the headings of docs/operations.md."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", OPERATIONS_DOC.read_text(), flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_section_in_the_operations_guide() -> None:
    anchors = _runbook_anchors()
    alerts = {str(rule["alert"]) for rule in _rules() if "alert" in rule}
    assert {alert.lower() for alert in alerts} <= anchors
    documented = {anchor for anchor in anchors if anchor.startswith("loyalty") and " " not in anchor}
    assert documented - {alert.lower() for alert in alerts} == set(), "runbooks of alerts that no longer exist"


def test_the_service_monitor_scrapes_every_services_metrics_port() -> None:
    manifests = render_profile(MONITORING_PROFILE)
    monitor = one(manifests, "ServiceMonitor", "ci-loyalty").body["spec"]
    (expression,) = monitor["selector"]["matchExpressions"]
    assert sorted(expression["values"]) == sorted(SERVICES)
    (endpoint,) = monitor["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    for service in SERVICES:
        svc = one(manifests, "Service", resource_name(service))
        labels = svc.labels
        assert monitor["selector"]["matchLabels"].items() <= labels.items()
        assert labels[expression["key"]] in expression["values"]
        assert "metrics" in {port["name"] for port in svc.body["spec"]["ports"]}
    for other in find(manifests, "Service"):
        if component(other) not in SERVICES:
            assert component(other) not in expression["values"]


def _series_names(exposition: str) -> set[str]:
    """Every series name a scrape of this exposition would store, including those of
    labelled metrics that have no sample yet (declared by the code, e.g. a failure counter)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


async def _scrape(settings: Settings, service: str) -> str:
    url = f"http://127.0.0.1:{settings.service(service).metrics_port}/metrics"
    return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())


async def test_every_metric_in_the_dashboards_and_alerts_is_exported_by_the_running_suite(tmp_path: Path) -> None:
    settings = infra.suite_settings(tmp_path)
    async with infra.running_suite(settings):
        program = await set_up_program(settings)
        async with infra.gateway_channel(settings) as channel:
            gateway = pos_grpc.PosServiceStub(channel)
            by_card = pos.CustomerIdentifier(card_number=program.card_number)
            sale = receipt("helm-1", 12_000, 3_450)
            calculated = await gateway.CalculateCheque(pos.CalculateChequeRequest(receipt=sale, identifier=by_card))
            await gateway.CommitCheque(
                pos.CommitChequeRequest(receipt=sale, identifier=by_card, calculation_id=calculated.calculation_id)
            )
        exported: set[str] = set()
        for service in SERVICES:
            exported |= _series_names(await _scrape(settings, service))
    used = used_metric_names()
    recorded = _recorded()
    assert used, "the dashboards and rules read no metric"
    missing = {
        name: sorted(where) for name, where in sorted(used.items()) if name not in exported and name not in recorded
    }
    assert missing == {}, "read by dashboards or alerts but exported by no service"


def test_every_dashboard_file_is_valid_json_with_a_trailing_newline() -> None:
    for path in DASHBOARDS.glob("*.json"):
        text = path.read_text()
        assert text.endswith("\n") and json.loads(text), path.name
