"""examples/prometheus and examples/grafana: the rules and queries parse, fire as meant, and only name
metrics (and labels) that a running proxy really exports.

``promtool`` (Debian's ``prometheus`` package) checks and unit-tests the rules when installed; the
tests that need it are skipped with a reason otherwise. The metric-name checks always run against a
real proxy's ``/metrics`` on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from affinity_proxy.serve.app import ProxyServer
from tests.support.backends import Backends, make_config

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "examples" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
GRAFANA = ROOT / "examples" / "grafana" / "affinity-proxy.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is absent (make test installs prometheus: .ci/install-deps)"
)

METRIC_RE = re.compile(r"\baffinity_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(affinity_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
#: Labels Prometheus adds on scrape; ``exported_instance`` is the metrics' own ``instance`` label
#: renamed (honor_labels: false), ``le`` the histogram bucket bound.
SCRAPE_LABELS = {"job", "instance", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def grafana_exprs() -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(GRAFANA.read_text())["panels"])


def concrete(expr: str) -> str:
    """A Grafana query with its variables replaced, so plain PromQL tools can parse it."""
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$job", ".*").replace("$node", ".*"))


# --- promtool -----------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_fire_the_alerts_from_synthetic_series() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    names = {case["alertname"] for test in tested["tests"] for case in test["alert_rule_test"]}
    assert {"AffinityStoreDown", "AffinityReplayLoopPrevented", "AffinitySessionImbalance"} <= names


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_grafana_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"grafana:query_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(grafana_exprs())]
    path = tmp_path / "grafana_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- the files themselves -----------------------------------------------------------------------------

def test_every_alert_has_severity_summary_and_description() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    required = {"AffinityReplayShareHigh", "AffinityReplayStatusShareHigh", "AffinityReplayLoopPrevented",
                "AffinityStoreDown", "AffinityNoRoutableInstance", "AffinityPinImbalance", "AffinityUpstreamErrorRate"}
    assert required <= set(names)
    by_name = {r["alert"]: r for r in rules}
    assert by_name["AffinityStoreDown"]["for"] == "1m"
    assert by_name["AffinityPinImbalance"]["for"] == "15m"
    assert "[10m]" in by_name["AffinityReplayShareHigh"]["expr"]


def test_grafana_dashboard_is_valid_and_covers_the_metrics() -> None:
    doc = json.loads(GRAFANA.read_text())
    assert doc["uid"] and doc["title"] == "affinity-proxy"
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    used = {name for _, expr in grafana_exprs() for name in METRIC_RE.findall(expr)}
    for wanted in ("affinity_requests_total", "affinity_replays_total", "affinity_responses_total",
                   "affinity_repins_total", "affinity_pins", "affinity_instances",
                   "affinity_upstream_request_duration_seconds_bucket", "affinity_store_up",
                   "affinity_store_errors_total", "affinity_websocket_connections"):
        assert wanted in used, wanted


# --- against a live proxy -----------------------------------------------------------------------------

@pytest.fixture
async def live_metrics(backends: Backends) -> AsyncIterator[tuple[str, ProxyServer]]:
    """The /metrics text of a real proxy after some traffic: users pinned, a re-pin after an
    instance died (an upstream error), a WebSocket relayed."""
    server = ProxyServer(make_config(backends))
    await server.start()
    base = f"http://127.0.0.1:{server.main_port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            for i in range(12):
                async with http.get(f"{base}/p", headers={"X-User-Id": f"u{i}"}) as resp:
                    assert resp.status == 200
            async with http.ws_connect(f"{base}/ws", headers={"X-User-Id": "u0"}) as ws:
                await ws.send_str("hi")
                await asyncio.wait_for(ws.receive(), 5)
            await backends.stop("b")
            for i in range(12):
                async with http.get(f"{base}/p", headers={"X-User-Id": f"u{i}"}) as resp:
                    assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
                text = await resp.text()
        yield text, server
    finally:
        await server.stop()


def exported_names(text: str) -> dict[str, str]:
    """Every series name the exposition can produce -> its family name (from the families' types,
    so labelled metrics that have no sample yet still count)."""
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.name
    return names


def family_labels(server: ProxyServer) -> dict[str, set[str]]:
    """Label names of every metric the proxy defines, as Prometheus stores them (``instance`` ->
    ``exported_instance``). prometheus-client has no public accessor for a wrapper's label names."""
    out: dict[str, set[str]] = {}
    for value in vars(server.ctx.metrics).values():
        if isinstance(value, MetricWrapperBase):
            labels = {"exported_instance" if n == "instance" else n for n in value._labelnames}
            out[value._name] = labels
    out["affinity_pins"] = {"exported_instance"}  # computed at scrape time by a collector
    out["affinity_instances"] = {"state"}
    return out


def check_exprs(exprs: list[tuple[str, str]], names: dict[str, str], labels_of: dict[str, set[str]]) -> None:
    """Every metric named in ``exprs`` is in ``names`` (series name -> family), every label matched
    on it is one of its family's labels (or a scrape label), every grouping label is known."""
    known_labels = set().union(*labels_of.values()) | SCRAPE_LABELS
    assert names, "no metrics exported"
    for where, expr in exprs:
        used = METRIC_RE.findall(expr)
        assert used, f"{where}: names no affinity_ metric"
        missing = sorted(set(used) - set(names))
        assert not missing, f"{where}: {missing} not in /metrics"
        for metric, matchers in SELECTOR_RE.findall(expr):
            allowed = labels_of[names[metric]] | SCRAPE_LABELS
            for label in MATCHER_RE.findall(matchers):
                assert label in allowed, f"{where}: {metric} has no label {label!r}"
        for grouping in GROUPING_RE.findall(expr):
            for label in filter(None, (s.strip() for s in grouping.split(","))):
                assert label in known_labels, f"{where}: unknown label {label!r} in grouping"


async def test_every_metric_in_alerts_exists_in_a_live_proxy(live_metrics: tuple[str, ProxyServer]) -> None:
    text, server = live_metrics
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules() if METRIC_RE.search(rule["expr"])]
    assert len(exprs) == len(alert_rules()) - 1  # all but AffinityProxyDown (Prometheus' own `up`)
    check_exprs(exprs, exported_names(text), family_labels(server))
    for metric in ("affinity_requests_total", "affinity_repins_total", "affinity_upstream_errors_total",
                   "affinity_upstream_request_duration_seconds_bucket", "affinity_store_up", "affinity_pins"):
        assert re.search(rf"^{metric}[{{ ]", text, re.M), f"{metric} has samples after the traffic"


async def test_every_metric_in_the_grafana_dashboard_exists_in_a_live_proxy(
    live_metrics: tuple[str, ProxyServer],
) -> None:
    text, server = live_metrics
    exprs = [(title, concrete(expr)) for title, expr in grafana_exprs()]
    check_exprs(exprs, exported_names(text), family_labels(server))


def test_the_checker_rejects_unknown_names_and_labels() -> None:
    names = exported_names("# TYPE affinity_store_up gauge\naffinity_store_up 1\n")
    labels_of: dict[str, set[str]] = {"affinity_store_up": set()}
    check_exprs([("ok", 'min by (instance) (affinity_store_up{job="x"}) == 0')], names, labels_of)
    with pytest.raises(AssertionError, match="not in /metrics"):
        check_exprs([("x", "affinity_store_upp == 0")], names, labels_of)
    with pytest.raises(AssertionError, match="no label"):
        check_exprs([("x", 'affinity_store_up{nodes="a"} == 0')], names, labels_of)
    with pytest.raises(AssertionError, match="unknown label"):
        check_exprs([("x", "sum by (repin_reasons) (affinity_store_up)")], names, labels_of)
