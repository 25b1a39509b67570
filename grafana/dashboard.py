#!/usr/bin/env python3
"""Generates grafana/smtp-gateway.json (Grafana 10/11 schema). Edit here, then run
`python grafana/dashboard.py`; a test checks the JSON is this script's output.

Every query filters on the `job` and `instance` variables and rates over
`$__rate_interval`, so the dashboard works with any scrape interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SEL = 'job=~"$job", instance=~"$instance"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{SEL}, {extra}" if extra else SEL
    return f"sum by ({by}) (rate({metric}{{{sel}}}[$__rate_interval]))"


def quantile(q: float, metric: str, by: str, extra: str = "") -> str:
    inner = rate(f"{metric}_bucket", f"le, {by}" if by else "le", extra)
    return f"histogram_quantile({q}, {inner})"


def quantiles(
    metric: str, extra: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> list[tuple[str, str]]:
    return [(quantile(q, metric, "", extra), f"p{round(q * 100)}") for q in qs]


# (title, description, [(expr, legend)], unit, kind)
Panel = tuple[str, str, list[tuple[str, str]], str, str]

ROWS: list[tuple[str, list[Panel]]] = [
    ("Traffic", [
        ("Instances up",
         "1 while Prometheus scrapes an instance, 0 when the scrape fails (down, hung,"
         " unreachable): the SmtpGatewayDown alert.",
         [(f"up{{{SEL}}}", "{{instance}}")], "short", "ts"),
        ("Transactions by outcome",
         "Completed SMTP transactions per second: delivered, rejected, tempfailed, aborted.",
         [(rate("smtp_gateway_transactions_total", "outcome"), "{{outcome}}")], "ops", "ts"),
        ("Connections by result",
         "New client connections per second: accepted, or refused and why.",
         [(rate("smtp_gateway_connections_total", "result"), "{{result}}")], "ops", "ts"),
        ("Active connections",
         "Open client sessions per listener, all instances summed.",
         [(f"sum by (listener) (smtp_gateway_active_connections{{{SEL}}})", "{{listener}}")],
         "short", "ts"),
        ("Recipients by outcome",
         "RCPT commands per second by outcome (accepted, rejected, tempfailed).",
         [(rate("smtp_gateway_recipients_total", "outcome"), "{{outcome}}")], "ops", "ts"),
        ("Message size",
         "Median and 95th percentile size of messages received.",
         [(quantile(0.5, "smtp_gateway_message_size_bytes", ""), "p50"),
          (quantile(0.95, "smtp_gateway_message_size_bytes", ""), "p95")], "bytes", "ts"),
        ("Message memory",
         "Message data held in memory (or pledged to a MAIL's SIZE=) per instance, and its"
         " budget (limits.max_data_memory); at the budget new MAILs wait for room, then get"
         " 452 4.3.1 (reason no_memory).",
         [(f"sum by (instance) (smtp_gateway_message_memory_bytes{{{SEL}}})",
           "in use {{instance}}"),
          (f"sum by (instance) (smtp_gateway_message_memory_limit_bytes{{{SEL}}})",
           "budget {{instance}}")], "bytes", "ts"),
        ("MAILs waiting for memory",
         "MAILs waiting their turn for room in the message data budget, per instance"
         " (limits.data_memory_wait); a wait that runs out is a 452 4.3.1 (reason no_memory).",
         [(f"sum by (instance) (smtp_gateway_message_memory_waiters{{{SEL}}})",
           "waiting {{instance}}")], "short", "ts"),
        ("MAILs that waited for memory, by result",
         "MAILs per second that had to wait for room in the message data budget: admitted"
         " after the wait, or timeout (452 4.3.1, reason no_memory).",
         [(rate("smtp_gateway_message_memory_waits_total", "result"), "{{result}}")],
         "ops", "ts"),
    ]),
    ("Rejections", [
        ("Policy refusals by stage",
         "What the policy refused or deferred at each stage (connect, helo, mail, rcpt, data),"
         " by action and the deciding symbol: refusals at connect included.",
         [(rate("smtp_gateway_refusals_total", "stage, action, reason"),
           "{{stage}} {{action}} {{reason}}")], "ops", "ts"),
        ("Refused transactions by reason",
         "Transactions the gateway (or the backend) refused, by the reason recorded.",
         [(rate("smtp_gateway_transactions_total", "outcome, reason",
                'outcome=~"rejected|tempfailed"'), "{{outcome}} {{reason}}")], "ops", "ts"),
        ("Refused recipients by reason",
         "Recipients refused: relay control, policy, rate limits, the backend.",
         [(rate("smtp_gateway_recipients_total", "outcome, reason",
                'outcome=~"rejected|tempfailed"'), "{{outcome}} {{reason}}")], "ops", "ts"),
        ("Protocol errors",
         "Client protocol errors by reason (unknown commands, bad syntax, bad sequence);"
         " the policy's refusals are not among them.",
         [(rate("smtp_gateway_command_errors_total", "reason"), "{{reason}}")], "ops", "ts"),
    ]),
    ("Sender authentication", [
        ("SPF, DKIM, DMARC, ARC results",
         "Symbols emitted by the authentication checks per second.",
         [(rate("smtp_gateway_check_results_total", "symbol",
                'check=~"spf|dkim|dmarc|arc"'), "{{symbol}}")], "ops", "ts"),
        ("All check symbols",
         "Every symbol any check emitted (relay, dnsbl, ratelimit, tls, ...).",
         [(rate("smtp_gateway_check_results_total", "check, symbol"), "{{symbol}}")],
         "ops", "ts"),
    ]),
    ("Content scanning", [
        ("Scan latency",
         "Time clamd or Rspamd took for one message (connecting, sending it, the answer),"
         " per scanner: p50, p95, p99. The wait for a free slot under max_concurrent is not"
         " in it (see the scanners' check time); the SmtpGatewayScannerSlow alert fires at a"
         " p95 over 5 s.",
         [(quantile(q, "smtp_gateway_scan_seconds", "scanner"),
           f"{{{{scanner}}}} p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], "s", "ts"),
        ("Scanner verdicts by symbol",
         "What the scanners found, per second: virus.found (clamav), rspamd.reject,"
         " rspamd.add_header, ... and the failures the policy acted on (<scanner>.unavailable,"
         " .timeout, .too_big). A clean message emits no symbol.",
         [(rate("smtp_gateway_check_results_total", "check, symbol",
                'check=~"clamav|rspamd"'), "{{symbol}}")], "ops", "ts"),
        ("Scanner errors by kind",
         "Scans that gave no verdict, per scanner and kind: unavailable (refused, cut off),"
         " timeout (no answer by the check's timeout), protocol (an answer not understood);"
         " the policy's <scanner>.unavailable or <scanner>.timeout action applied.",
         [(rate("smtp_gateway_scanner_errors_total", "scanner, kind"), "{{scanner}} {{kind}}")],
         "ops", "ts"),
        ("Scanner error share",
         "Errors per scan sent, per scanner (capped at 1: scans that timed out waiting for a"
         " slot count as errors but were never sent); the SmtpGatewayScannerFailing alert"
         " fires over 10%.",
         [(f"clamp_max({rate('smtp_gateway_scanner_errors_total', 'scanner')}"
           f" / {rate('smtp_gateway_scan_seconds_count', 'scanner')}, 1)", "{{scanner}}")],
         "percentunit", "ts"),
        ("Scanner check time p99",
         "99th percentile time of the scanner checks as the runner sees it: the wait for a"
         " slot under max_concurrent included, so it is bounded by the check's timeout.",
         [(quantile(0.99, "smtp_gateway_check_seconds", "check", 'check=~"clamav|rspamd"'),
           "{{check}}")], "s", "ts"),
        ("Scanner connections opened vs reused",
         "Connections to each scanner per second: opened (a new one) or reused (a kept one,"
         " keep_connections). Rspamd's own worker closes every connection: all opened there.",
         [(rate("smtp_gateway_scanner_connections_total", "scanner, result"),
           "{{scanner}} {{result}}")], "ops", "ts"),
    ]),
    ("DNS block lists and rate limits", [
        ("DNSBL lookups by zone and result",
         "Lookups per zone name: listed, not listed, error, timeout.",
         [(rate("smtp_gateway_dnsbl_lookups_total", "zone, result"), "{{zone}} {{result}}")],
         "ops", "ts"),
        ("DNSBL zone health",
         "1 while a zone passes its RFC 5782 test entries; an unhealthy zone is skipped.",
         [(f"min by (zone) (smtp_gateway_dnsbl_zone_healthy{{{SEL}}})", "{{zone}}")],
         "short", "ts"),
        ("Rate-limit hits by limit",
         "Requests refused by each configured rate or concurrency limit.",
         [(rate("smtp_gateway_ratelimit_hits_total", "limit"), "{{limit}}")], "ops", "ts"),
        ("Rate-limit store errors",
         "Failed Redis operations; the policy's ratelimit.unavailable action applied.",
         [(rate("smtp_gateway_ratelimit_store_errors_total", "operation"), "{{operation}}")],
         "ops", "ts"),
        ("Greylisting by result",
         "Triplets judged per second: new and early were deferred (451 4.7.1); passed,"
         " whitelisted and network (auto-whitelisted) went through; exempt skipped by the"
         " policy; unavailable: the store (Redis) did not answer.",
         [(rate("smtp_gateway_greylist_triplets_total", "result"), "{{result}}")], "ops", "ts"),
    ]),
    ("TLS", [
        ("Sessions by TLS version",
         "Client sessions by the TLS version they ended with ('none': plaintext).",
         [(rate("smtp_gateway_tls_sessions_total", "version"), "{{version}}")], "ops", "ts"),
        ("TLS share of sessions",
         "Share of client sessions that ended encrypted (any TLS version) among all sessions"
         " that ended.",
         [(f'sum(rate(smtp_gateway_tls_sessions_total{{{SEL}, version!="none"}}'
           f"[$__rate_interval])) / sum(rate(smtp_gateway_tls_sessions_total{{{SEL}}}"
           "[$__rate_interval]))", "TLS")], "percentunit", "ts"),
        ("TLS handshake failures",
         "Failed client handshakes by reason (protocol version, cipher, certificate, ...).",
         [(rate("smtp_gateway_tls_handshake_failures_total", "reason"), "{{reason}}")],
         "ops", "ts"),
        ("Days until certificate expiry",
         "Per listener certificate; the CertificateExpiringSoon alert fires under 14 days.",
         [(f"min by (listener, certificate) (smtp_gateway_tls_certificate_expiry_timestamp_seconds{{{SEL}}} - time()) / 86400",  # noqa: E501
           "{{listener}} {{certificate}}")], "d", "stat"),
    ]),
    ("Backend", [
        ("Backend available",
         "1 while at least one backend target accepts sessions (circuit closed or half-open).",
         [(f"min(smtp_gateway_backend_available{{{SEL}}})", "available")], "short", "stat"),
        ("Backend replies by class",
         "Replies from the backend per command and class (2xx, 4xx, 5xx, error).",
         [(rate("smtp_gateway_backend_replies_total", "command, class"),
           "{{command}} {{class}}")], "ops", "ts"),
        ("Backend reply latency p99",
         "99th percentile time from a command to the backend's reply.",
         [(quantile(0.99, "smtp_gateway_backend_reply_seconds", "command"), "{{command}}")],
         "s", "ts"),
        ("Backend connects by result",
         "Connection attempts to the backend per second: ok, refused, timeout, busy (a 4xx"
         " greeting: at its connection limit), failed (a 5xx greeting, a TLS or protocol"
         " error). The SmtpGatewayBackendConnectFailures alert fires over 20% not ok.",
         [(rate("smtp_gateway_backend_connects_total", "result"), "{{result}}")], "ops", "ts"),
        ("Backend greeting latency",
         "Median and 99th percentile time from connecting to the backend to its greeting;"
         " the SmtpGatewayBackendSlow alert fires at a p99 over 2.5 s.",
         quantiles("smtp_gateway_backend_reply_seconds", 'command="greeting"', (0.5, 0.99)),
         "s", "ts"),
        ("Backend session waits by result",
         "Transactions per second that waited for a backend session at backend.max_sessions,"
         " per target: ok (got one) or timeout (451 4.4.5, reason backend_busy).",
         [(rate("smtp_gateway_backend_session_waits_total", "target, result"),
           "{{target}} {{result}}")], "ops", "ts"),
        ("Backend circuit breakers and pool",
         "Open circuit breakers per target (1 = open) and spare sessions kept ready.",
         [(f"max by (target) (smtp_gateway_backend_circuit_open{{{SEL}}})", "open {{target}}"),
          (f"sum by (target) (smtp_gateway_backend_pool_idle_sessions{{{SEL}}})",
           "spare {{target}}")], "short", "ts"),
        ("Backend sessions and waiting transactions",
         "Sessions open to each target (capped by backend.max_sessions) and transactions"
         " waiting for one; a wait that runs out is a 451 4.4.5 (reason backend_busy).",
         [(f"sum by (target) (smtp_gateway_backend_sessions_open{{{SEL}}})", "open {{target}}"),
          (f"sum by (target) (smtp_gateway_backend_session_waiters{{{SEL}}})",
           "waiting {{target}}")], "short", "ts"),
    ]),
    ("DNS", [
        ("DNS queries by outcome",
         "Queries sent by the shared resolver, by outcome (ok, nxdomain, servfail, timeout).",
         [(rate("smtp_gateway_dns_queries_total", "outcome"), "{{outcome}}")], "ops", "ts"),
        ("DNS latency p95",
         "95th percentile time to an answer for cache misses, by record type.",
         [(quantile(0.95, "smtp_gateway_dns_query_seconds", "type"), "{{type}}")], "s", "ts"),
        ("DNS cache hit ratio",
         "Share of lookups answered from the cache.",
         [(f'sum(rate(smtp_gateway_dns_cache_total{{{SEL}, result="hit"}}[$__rate_interval]))'
           f" / sum(rate(smtp_gateway_dns_cache_total{{{SEL}}}[$__rate_interval]))",
           "hit ratio")], "percentunit", "ts"),
    ]),
    ("Latency and operations", [
        ("Transaction duration",
         "Time from MAIL to the end of the transaction, all outcomes: the client's pace,"
         " the checks and the backend's replies; p50, p95, p99.",
         quantiles("smtp_gateway_transaction_seconds"), "s", "ts"),
        ("Session duration",
         "Time from connect to disconnect of client sessions; p50, p95, p99.",
         quantiles("smtp_gateway_session_seconds"), "s", "ts"),
        ("Check latency p99",
         "99th percentile time per check (DNS waits included).",
         [(quantile(0.99, "smtp_gateway_check_seconds", "check"), "{{check}}")], "s", "ts"),
        ("Stage latency p99",
         "99th percentile time of all checks of an SMTP stage together.",
         [(quantile(0.99, "smtp_gateway_stage_seconds", "stage"), "{{stage}}")], "s", "ts"),
        ("Address rewrites",
         "Addresses changed per rewrite stage, and alias loops refused.",
         [(rate("smtp_gateway_rewrites_total", "stage"), "{{stage}}"),
          (f"sum(rate(smtp_gateway_rewrite_loops_total{{{SEL}}}[$__rate_interval]))",
           "loops")], "ops", "ts"),
        ("Reloads and restarts",
         "Policy reloads and certificate reloads by result, and worker processes restarted"
         " after dying, in the hour before each point (failed reloads and restarts alert).",
         [(f"sum by (result) (increase(smtp_gateway_config_reloads_total{{{SEL}}}[1h]))",
           "policy {{result}}"),
          (f"sum by (result) (increase(smtp_gateway_tls_certificate_reloads_total{{{SEL}}}[1h]))",
           "certificate {{result}}"),
          (f"sum(increase(smtp_gateway_worker_restarts_total{{{SEL}}}[1h]))", "worker restarts")],
         "short", "ts"),
        ("Version",
         "Running versions (smtp_gateway_build_info) and how many instances run each.",
         [(f"count by (version) (smtp_gateway_build_info{{{SEL}}})", "{{version}}")],
         "short", "stat"),
    ]),
]  # fmt: skip


def panel(pid: int, p: Panel, x: int, y: int) -> dict[str, Any]:
    title, desc, targets, unit, kind = p
    out: dict[str, Any] = {
        "id": pid,
        "type": "timeseries" if kind == "ts" else "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if kind == "ts"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [
            {"datasource": DS, "expr": e, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (e, legend) in enumerate(targets)
        ],
    }
    return out


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": "All", "value": "$__all"},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append(
            {"id": pid, "type": "row", "title": title, "collapsed": False,
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
        )  # fmt: skip
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row):
            panels.append(panel(pid, p, (i % 3) * 8, y + (i // 3) * 8))
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "uid": "smtp-gateway",
        "title": "SMTP gateway",
        "description": "smtp-gateway: instances, mail flow, refusals, authentication, content "
        "scanning, DNSBL, rate limits, TLS, backend, DNS, durations and latency, reloads and "
        "restarts.",
        "tags": ["smtp", "mail", "smtp-gateway"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("job", "Job", "label_values(smtp_gateway_build_info, job)"),
                variable(
                    "instance",
                    "Instance",
                    'label_values(smtp_gateway_build_info{job=~"$job"}, instance)',
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "smtp-gateway.json").write_text(render())
