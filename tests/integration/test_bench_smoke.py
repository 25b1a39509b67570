"""The benchmark harness itself runs (tiny scale). It asserts the harness's output,
never speed: speed is measured by `python bench/run.py`, not by tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT


def test_bench_harness_runs_every_mode_and_figure(tmp_path: Path) -> None:
    for tool in ("smtp-source", "smtp-sink"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), (
            f"{tool} is required (apt-get install postfix; .ci/run installs it)"
        )
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/run.py"),
            "--repeat",
            "1",
            "--scale",
            "0.02",
            "--workers",
            "2",  # the default here: each worker's metrics reach a scrape within a second
            "--idle-sessions",
            "300",
            "--peak-clients",
            "20",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    seen = {(row["shape"], row["mode"]) for row in res["throughput"]}
    for shape in ("small", "large", "persistent"):
        for mode in ("direct", "floor", "proxy", "policy", "scanning"):
            assert (shape, mode) in seen
    sizes = {"small": 4096, "large": 102400, "persistent": 4096}
    for row in res["throughput"]:
        assert row["rate"] > 0 and row["ratio"] > 0
        if row["mode"] != "direct":
            assert row["cpu_ms"] > 0 and row["peak_mb"] > 0
            if row["mode"] == "floor":  # the yardstick relay has no metrics of its own
                assert row["delivered"] is None
                continue
            # What went through is what the bench claims: every message, of the
            # shape's size (plus our Received/Authentication-Results headers), and
            # DKIM-signed so that the policy modes really verify a signature.
            for run in row["delivered"]:
                assert run["messages"] == row["messages"]
                assert sizes[row["shape"]] <= run["avg_bytes"] < sizes[row["shape"]] * 1.2
                if row["mode"] in ("policy", "scanning"):
                    assert run["dkim_pass"] == 1.0
        # The scanners' own CPU is measured apart, and only where they run.
        if row["mode"] == "scanning":
            assert row["scanner_cpu_ms"] > 0
        else:
            assert row["scanner_cpu_ms"] is None
    assert res["latency"]["gateway"]["p99"] >= res["latency"]["gateway"]["p50"] > 0
    assert res["idle"]["sessions"] == 300 and res["idle"]["rss_after_mb"] > 0
    assert {c["check"] for c in res["checks"]} >= {"relay"}
    # The peak: each client's message ended in a 250 the gateway counted or a 4xx
    # (the harness stops otherwise); the guards were set and something got through.
    peak = {c["case"]: c for c in res["peak"]["cases"]}
    assert set(peak) == {"guarded", "guarded, no wait", "unguarded"}
    for case in peak.values():
        assert sum(case["replies"].values()) == 20
        assert (
            0
            < case["delivered"]
            == sum(n for reply, n in case["replies"].items() if reply.startswith("250"))
        )
        assert case["rss_peak_mb"] >= case["rss_base_mb"] > 0


def test_calls_per_message_is_measured_and_repeatable(tmp_path: Path) -> None:
    """bench/calls.py: the noise-free figure. Two runs of the same code agree."""
    figures = []
    for i in range(2):
        out = tmp_path / f"calls{i}.json"
        r = subprocess.run(
            [sys.executable, str(ROOT / "bench/calls.py"), "--modes", "proxy",
             "--messages", "100", "--json", str(out)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        (res,) = json.loads(out.read_text())
        assert res["mode"] == "proxy" and res["messages"] == 100
        # The session's own code is in the profile, counted per message.
        loop = [v for k, v in res["functions"].items() if k.startswith("session.py:")
                and k.endswith("(run)")]  # fmt: skip
        assert loop and loop[0] >= 1
        figures.append(res["calls_per_message"])
    assert 100 < figures[0] < 5000
    assert abs(figures[0] - figures[1]) <= 0.05 * figures[0]  # within 0.3% at --messages 1000
