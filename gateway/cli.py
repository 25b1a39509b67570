"""Command line: `smtp-gateway run`, `smtp-gateway config check FILE`, and the operators'
commands (`ratelimit`, `greylist`, `rewrite`, `check`, `health`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import TYPE_CHECKING

from gateway import __version__, config, logs

if TYPE_CHECKING:
    from gateway.pipeline.policy import Policy

# Nothing that imports gateway.metrics (prometheus_client) may be imported at the
# top of this module: with workers the metric storage is chosen at that import,
# after prepare_multiproc.

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smtp-gateway", description="Inbound SMTP security gateway")
    p.add_argument("--version", action="version", version=f"smtp-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (embedded defaults without --config)")
    run.add_argument(
        "--config", "-c", default=os.environ.get("GATEWAY_CONFIG"),
        help="YAML config file (default: $GATEWAY_CONFIG, else the embedded defaults)",
    )  # fmt: skip

    chk = sub.add_parser(
        "check",
        help="the pipeline's verdict on one message (no backend)",
        epilog="exit status: 0 accepted, 3 tagged, 4 quarantined, 5 deferred (tempfail), "
        "6 rejected; 1 an error, 2 a configuration or usage error",
    )
    chk.add_argument("message", help="the message, as an .eml file")
    chk.add_argument("--client-ip", required=True, type=_ip, help="the client's IP address")
    chk.add_argument("--helo", required=True)
    chk.add_argument("--mail-from", required=True, help="envelope sender ('' for <>)")
    chk.add_argument("--rcpt", required=True, action="append", help="repeat for several")
    chk.add_argument("--config", "-c", help="YAML config (DNS servers, policy, domains)")
    chk.add_argument("--json", action="store_true", help="machine-readable output")

    rl = sub.add_parser("ratelimit", help="show or reset what a rate/concurrency limit counted")
    rl.add_argument("action", choices=["show", "reset"])
    rl.add_argument("key", help="LIMIT:VALUE (one key, e.g. per_ip:192.0.2.7) or LIMIT (all)")
    rl.add_argument("--config", "-c", help="YAML config file (finds the store)")

    gl = sub.add_parser(
        "greylist",
        help="show, allow or reset greylist entries",
        epilog="CLIENT: an IP address (its network), a network, or spf:DOMAIN; SENDER '' or"
        " '<>' is the null sender; addresses are normalised as the check does",
    )
    gl.add_argument("action", choices=["show", "allow", "reset"])
    gl.add_argument("client", help="IP address, network, or spf:DOMAIN")
    gl.add_argument("sender", nargs="?", help="envelope sender (MAIL FROM)")
    gl.add_argument("recipient", nargs="?", help="envelope recipient (RCPT TO)")
    gl.add_argument("--config", "-c", help="YAML config file (finds the store and the policy)")

    rw = sub.add_parser("rewrite", help="show each rewrite stage's result for an address")
    rw.add_argument("address")
    side = rw.add_mutually_exclusive_group(required=True)
    side.add_argument("--sender", action="store_true", help="as MAIL FROM")
    side.add_argument("--recipient", action="store_true", help="as RCPT TO")
    rw.add_argument("--config", "-c", help="YAML config file (policy and local_domains)")

    health = sub.add_parser(
        "health",
        help="exit 0 if the gateway answers on its metrics endpoint (/healthz/live)",
        epilog="the config file: --config, else $GATEWAY_CONFIG; the endpoint: metrics.listen"
        " (a wildcard address is asked on loopback)",
    )
    health.add_argument("--config", "-c", default=os.environ.get("GATEWAY_CONFIG"))
    health.add_argument("--ready", action="store_true", help="ask /healthz/ready instead")

    dr = sub.add_parser(
        "dmarc-report",
        help="make and send the DMARC aggregate reports now (those of the intervals ended)",
        epilog="the gateway sends them itself once per interval; this runs the same under"
        " the same lease (docs/dmarc-reports.md)",
    )
    dr.add_argument("--config", "-c", default=os.environ.get("GATEWAY_CONFIG"))
    dr.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; change nothing"
    )
    dr.add_argument(
        "--now", type=float, metavar="SECONDS",
        help="act as if it were this time (UTC seconds since the epoch)",
    )  # fmt: skip

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file and the policy it names")
    check.add_argument("file")
    return p


def _ip(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None


def cmd_validate(settings: config.Settings, source: str) -> Policy:
    """Everything that can be checked without binding a port; raises ConfigError
    naming `source` (the config file) and the key."""
    from gateway.checks.registry import all_known_symbols
    from gateway.pipeline import policy as policy_mod
    from gateway.smtp import tls

    try:
        pol = policy_mod.load(settings.policy, all_known_symbols())
        for i, lc in enumerate(settings.listeners):
            tls.server_context(lc, i, export=False)
    except (policy_mod.PolicyNotFound, tls.TlsConfigError) as e:
        raise config.ConfigError(f"{source}: {e}") from None
    for warning in policy_warnings(settings, pol):
        print(f"smtp-gateway: {source}: warning: {warning}", file=sys.stderr)
    return pol


def policy_warnings(settings: config.Settings, pol: Policy) -> list[str]:
    """What is valid but likely not meant. The virus scan only: a message too big
    for it and accepted unscanned is a way past it (Rspamd's smaller default
    max_size is a choice the documentation explains)."""
    from gateway.checks.scanner import unscanned_gap
    from gateway.vocab import Action

    clam = pol.checks.clamav
    if not clam.enabled or pol.action_for("clamav.too_big") is not Action.ACCEPT:
        return []
    gap = unscanned_gap("clamav", clam.max_size, settings.limits.max_message_size)
    return [gap] if gap else []


def cmd_config_check(path: str) -> int:
    settings = config.load(path)
    cmd_validate(settings, path)
    print(f"{path}: OK ({len(settings.listeners)} listener(s), policy {settings.policy})")
    return 0


def cmd_health(path: str | None, ready: bool) -> int:
    """For a container's HEALTHCHECK: the metrics endpoint the configuration names,
    so it follows metrics.listen (and GATEWAY_METRICS_LISTEN) wherever it is."""
    import ipaddress
    import urllib.error
    import urllib.request

    settings = config.load(path)
    if settings.metrics.listen is None:
        print("smtp-gateway: metrics.listen is off: no endpoint to ask", file=sys.stderr)
        return EXIT_CONFIG
    host, port = config.split_hostport(settings.metrics.listen)
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        addr = ipaddress.ip_address("::1" if addr.version == 6 else "127.0.0.1")
    where = f"[{addr}]" if addr.version == 6 else str(addr)
    url = f"http://{where}:{port}/healthz/{'ready' if ready else 'live'}"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            print(f"{url}: {r.status}")
            return 0
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1


def cmd_run(path: str | None) -> int:
    settings = config.load(path)
    logs.setup(settings.logging.level, settings.logging.format)
    from gateway import workers

    workers.raise_fd_limit()
    count = settings.workers or workers.available_cpus()
    if count == 1:
        cmd_validate(settings, path or "(embedded defaults)")
        return _serve(settings, reuse_port=False, workers=1)
    addresses = [(lc.address, lc.port) for lc in settings.listeners]
    if settings.metrics.listen:
        addresses.append(config.split_hostport(settings.metrics.listen))
    workers.ensure_free(addresses)
    # Before anything imports prometheus_client (multiprocess mode is chosen at import).
    mp_dir, created = workers.prepare_multiproc(settings.metrics.multiproc_dir)
    table = None
    try:
        # Policy and TLS errors stop the master, not every worker.
        cmd_validate(settings, path or "(embedded defaults)")
        if not settings.store.redis_url:
            # The workers count rate limits in one table, as one process would
            # (store/shared.py); made even with no limits yet, for a reload that adds one.
            from gateway.store.shared import SharedStore

            path = os.path.join(mp_dir, "ratelimit.table")
            SharedStore.create(path, count)
            table = path
            # And the greylist's, found beside it (store/greylist_shared.py).
            from gateway.store.greylist_shared import SharedGreylist, table_path

            SharedGreylist.create(table_path(table))
        return workers.supervise(
            count,
            lambda i: _serve(settings, reuse_port=True, limits_table=(table, i), workers=count),
        )
    finally:
        if table is not None:
            os.unlink(table)
            from gateway.store.greylist_shared import table_path

            with contextlib.suppress(FileNotFoundError):
                os.unlink(table_path(table))
        workers.cleanup(mp_dir, created)


def _serve(
    settings: config.Settings,
    *,
    reuse_port: bool,
    limits_table: tuple[str | None, int] = (None, 0),
    workers: int,
) -> int:
    from gateway.app import App

    async def serve() -> None:
        app = App(settings, limits_table, workers)
        app.reuse_port = reuse_port
        await app.run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.config)
        if args.command == "check":
            from gateway import explain

            return explain.run(args)
        if args.command == "rewrite":
            from gateway import rewrite_cli

            return rewrite_cli.run(args.address, args.sender, args.config)
        if args.command == "ratelimit":
            from gateway import ratelimit_admin

            return ratelimit_admin.run(args.action, args.key, args.config)
        if args.command == "greylist":
            from gateway import greylist_admin

            return greylist_admin.run(
                args.action, args.client, args.sender, args.recipient, args.config
            )
        if args.command == "dmarc-report":
            from gateway.dmarcreports import command

            return command.run(args.config, args.dry_run, args.now)
        if args.command == "health":
            return cmd_health(args.config, args.ready)
        if args.command == "config" and args.config_command == "check":
            return cmd_config_check(args.file)
    except config.ConfigError as e:
        print(f"smtp-gateway: configuration error:\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"smtp-gateway: {e}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
