"""deploy/: the alert rules and the Grafana dashboard query only metrics the consumer exports,
and the rules' thresholds are the slot check's defaults. (How the rules fire is
`promtool test rules deploy/prometheus/alerts.test.yml`, run by `make alerts` in .ci/run.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdc_consumer.metrics import PrometheusMetrics, exported_names
from cdc_consumer.settings import SlotCheckSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "cdc-pipeline.json"

# Series Prometheus itself makes for every scrape target.
_SCRAPE_SERIES = frozenset({"up"})
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers,
    ranges and strings that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_exprs(node: Any) -> Iterator[str]:
    """Every query in the dashboard: panel targets' `expr`, and the template variables'
    `label_values(metric, label)`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "definition" and isinstance(value, str):
                found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", value)
                assert found, f"unexpected template query {value!r}"
                yield found.group(1)
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item)


@pytest.fixture(scope="module")
def exported() -> frozenset[str]:
    """The series names the consumer's registry serves."""
    return exported_names(PrometheusMetrics())


def test_every_metric_the_rules_query_is_exported(exported):
    """Each alert's expression selects at least one metric, and each is one the code exports
    (or `up`, which Prometheus records for the target)."""
    for rule in _rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported | _SCRAPE_SERIES, (rule["alert"], names - exported)


def test_every_metric_the_dashboard_queries_is_exported(exported):
    """Each dashboard query selects metrics the code exports, and the dashboard shows every
    metric family the code exports."""
    exprs = list(_dashboard_exprs(json.loads(DASHBOARD.read_text())))
    queried = set().union(*(metric_names(expr) for expr in exprs))
    assert queried <= exported | _SCRAPE_SERIES, queried - exported
    families = {family.name for family in PrometheusMetrics().registry.collect()}
    shown = {name for name in families if any(q.startswith(name) for q in queried)}
    assert shown == families


def test_the_rules_cover_what_the_issue_asks_for():
    """Down, not streaming, lag warning and critical, no confirm while lagging, dead letters,
    latency p99: one rule each."""
    assert {rule["alert"] for rule in _rules()} == {
        "CdcConsumerDown",
        "CdcConsumerNotStreaming",
        "CdcSlotLagWarning",
        "CdcSlotLagCritical",
        "CdcNoConfirmWhileLagging",
        "CdcDeadLettersRising",
        "CdcLatencyP99High",
    }


def test_thresholds_are_the_slot_checks_defaults():
    """The lag and stall thresholds in the rules are the defaults of CDC_LAG_WARNING_BYTES,
    CDC_LAG_CRITICAL_BYTES and CDC_STALL_WARNING_SECONDS."""
    fields = SlotCheckSettings.model_fields  # the defaults, whatever the environment says
    warning = fields["cdc_lag_warning_bytes"].default
    critical = fields["cdc_lag_critical_bytes"].default
    stall = int(fields["cdc_stall_warning_seconds"].default)
    rules = {rule["alert"]: rule["expr"] for rule in _rules()}
    assert f"cdc_lag_bytes >= {warning} " in rules["CdcSlotLagWarning"]
    assert f"cdc_lag_bytes < {critical}" in rules["CdcSlotLagWarning"]
    assert rules["CdcSlotLagCritical"] == f"cdc_lag_bytes >= {critical}"
    assert f"cdc_seconds_since_confirm >= {stall} " in rules["CdcNoConfirmWhileLagging"]


def test_metric_names_reads_selectors_not_functions_or_labels():
    """The extractor finds `cdc_x` and `up` but no function, keyword, label or value."""
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(cdc_x_bucket{job="a b"}[5m])))'
        ' > 10 and on (instance) up{job="cdc_consumer"} == 0 or absent(cdc_y)'
    )
    assert metric_names(expr) == {"cdc_x_bucket", "up", "cdc_y"}
