"""Command line: `smtp-gateway run`, `smtp-gateway config check FILE`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway import __version__, config, logs
from gateway.pipeline import policy as policy_mod

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smtp-gateway", description="Inbound SMTP security gateway")
    p.add_argument("--version", action="version", version=f"smtp-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway (embedded defaults without --config)")
    run.add_argument("--config", "-c", help="YAML config file")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    check = cfg_sub.add_parser("check", help="validate a config file and the policy it names")
    check.add_argument("file")
    return p


def _load(path: str | None) -> config.Settings:
    return config.load(path)


def cmd_config_check(path: str) -> int:
    from gateway.app import all_known_symbols

    settings = _load(path)
    policy_mod.load(settings.policy, all_known_symbols(settings))
    from gateway.smtp import tls

    for lc in settings.listeners:
        tls.server_context(lc)
    print(f"{path}: OK ({len(settings.listeners)} listener(s), policy {settings.policy})")
    return 0


def cmd_run(path: str | None) -> int:
    settings = _load(path)
    logs.setup(settings.logging.level, settings.logging.format)
    from gateway.app import App

    async def main() -> None:
        app = App(settings)
        await app.run()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args.config)
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
