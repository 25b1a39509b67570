"""The dashboard and the alert rules refer only to metrics and labels that exist, and
the alert rules pass promtool's checks and unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import Counter, Gauge, Histogram

from gateway import metrics
from tests.observability.promql import refs

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
# Added at scrape time: job and instance by Prometheus, namespace by the Prometheus
# Operator (ServiceMonitor targets).
TARGET_LABELS = {"namespace", "job", "instance"}
# Series Prometheus makes itself, allowed by name: `up` (1 if the scrape succeeded).
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set()}
OPERATIONS = ROOT / "docs" / "operations.md"
ALERTS = {
    "SmtpGatewayDown",
    "SmtpGatewayAbsent",
    "SmtpGatewayBackendUnavailable",
    "SmtpGatewayTempfailRatioHigh",
    "SmtpGatewayRejectionSpike",
    "SmtpGatewayDnsErrors",
    "SmtpGatewayCertificateExpiringSoon",
    "SmtpGatewayCertificateReloadFailed",
    "SmtpGatewayNoTraffic",
    "SmtpGatewayRateLimitStoreErrors",
    "SmtpGatewayMessageMemoryFull",
    "SmtpGatewayWorkerRestarts",
    "SmtpGatewayPolicyReloadFailed",
    "SmtpGatewayDnsblZoneUnhealthy",
    "SmtpGatewayBackendConnectFailures",
    "SmtpGatewayBackendSlow",
    "SmtpGatewayScannerFailing",
    "SmtpGatewayScannerSlow",
}


def known_series() -> dict[str, set[str]]:
    """Every sample name gateway/metrics.py exports, with its labels."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, Counter | Gauge | Histogram):
            continue
        name, labels = obj._name, set(obj._labelnames)
        if isinstance(obj, Counter):
            out[name + "_total"] = labels
        elif isinstance(obj, Gauge):
            out[name] = labels
        else:
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = labels
            out[name + "_count"] = labels
    return out


def dashboard() -> dict[str, Any]:
    return dict(json.loads((GRAFANA / "smtp-gateway.json").read_text()))


def panel_queries() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for p in dashboard()["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((GRAFANA / "alerts.yaml").read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def check_refs(where: str, expr: str, series: dict[str, set[str]]) -> None:
    series = {**series, **PROMETHEUS_SERIES}
    r = refs(expr)
    assert r.metrics, f"{where}: no metric in {expr}"
    unknown = r.metrics - series.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not defined in gateway/metrics.py"
    allowed = set().union(*(series[m] for m in r.metrics)) | TARGET_LABELS
    bad = r.labels - allowed
    assert not bad, f"{where}: labels {sorted(bad)} not on {sorted(r.metrics)}"


def test_every_dashboard_query_uses_existing_metrics_and_labels() -> None:
    series = known_series()
    queries = panel_queries()
    assert len(queries) >= 30
    for title, expr in queries:
        check_refs(f"panel {title!r}", expr, series)
        labels = refs(expr).labels
        assert {"job", "instance"} <= labels, f"panel {title!r} ignores $job/$instance"


def test_every_alert_uses_existing_metrics_and_has_summary_and_runbook() -> None:
    series = known_series()
    runbooks = OPERATIONS.read_text()
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        name = rule["alert"]
        check_refs(f"alert {name}", rule["expr"], series)
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, name
        assert ann["summary"] and ann["description"], name
        assert ann["runbook_url"] == f"docs/operations.md#{name}", name
        assert f'<a id="{name}"></a>' in runbooks, f"docs/operations.md has no runbook for {name}"
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def test_alerts_never_merge_namespaces() -> None:
    """Two releases in different namespaces (same job name, same chart) are separate:
    every aggregation and every vector matching keeps namespace and job."""
    for rule in alert_rules():
        for grouping in refs(rule["expr"]).groupings:
            assert grouping[:1] != ("-",), (rule["alert"], grouping)
            assert {"namespace", "job"} <= set(grouping), (rule["alert"], grouping)


def test_the_metric_helpers_see_what_the_registry_exports() -> None:
    """The test's own model of names: every sample family the registry has is in it."""
    from prometheus_client import REGISTRY

    series = known_series()
    for fam in REGISTRY.collect():
        if not fam.name.startswith("smtp_gateway_"):
            continue
        for sample in fam.samples:
            if sample.name.endswith("_created"):
                continue
            assert sample.name in series, sample.name
            assert set(sample.labels) <= series[sample.name], sample


def test_dashboard_shape() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import dashboard as gen  # grafana/dashboard.py
    finally:
        sys.path.pop(0)
    assert (GRAFANA / "smtp-gateway.json").read_text() == gen.render(), (
        "grafana/smtp-gateway.json is stale: run python grafana/dashboard.py"
    )
    d = dashboard()
    assert d["uid"] == "smtp-gateway" and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    for needed in ("Traffic", "Rejections", "Sender authentication", "Content scanning",
                   "DNS block lists and rate limits", "TLS", "Backend", "DNS",
                   "Latency and operations"):  # fmt: skip
        assert needed in rows
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["description"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            for window in re.findall(r"\brate\([^\[]*\[([^\]]+)\]", t["expr"]):
                assert window == "$__rate_interval", (p["title"], t["expr"])


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is required (apt-get install prometheus; .ci/run installs it)"
    return path


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", "alerts.yaml"], cwd=GRAFANA, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    test = subprocess.run(
        [tool, "test", "rules", "alerts-test.yaml"], cwd=GRAFANA, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    # Every alert has a unit test.
    tests = yaml.safe_load((GRAFANA / "alerts-test.yaml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}
