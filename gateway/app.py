"""Builds the components and owns the lifecycle: start, reload, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any

from gateway import __version__, config, logs, metrics, replies
from gateway.checks.dnsbl import DnsblCheck
from gateway.checks.registry import all_known_symbols, build_checks
from gateway.checks.relay import RelayCheck
from gateway.dns import Resolver
from gateway.forward.backend import Backend, SmtpBackend
from gateway.forward.maildir import MaildirBackend
from gateway.http import HttpEndpoint
from gateway.net import network_matcher
from gateway.pipeline import policy as policy_mod
from gateway.pipeline.runner import Runner
from gateway.smtp import tls
from gateway.smtp.memory import MessageMemory, auto_limit
from gateway.smtp.services import (
    ListenerState,
    Services,
    ehlo_lines,
    requiretls_possible,
    reseed_session_ids,
)
from gateway.smtp.session import Session
from gateway.store import make_store
from gateway.stream import Stream

if TYPE_CHECKING:
    from gateway.dmarcreports.service import DmarcReports

log = logging.getLogger("gateway.app")

# Room left under a backend's SIZE for the header fields the gateway adds in front of
# each message (Received, Authentication-Results, tags): a message of the size
# advertised must still fit at the backend with them.
PREFIX_ROOM = 4096


def build_backend(settings: config.Settings, workers: int = 1) -> Backend:
    urls = settings.backend.url
    if urls[0].startswith("maildir:"):
        return MaildirBackend(urls[0][len("maildir:") :])
    return SmtpBackend(settings.backend, settings.hostname, workers)


class App:
    def __init__(
        self,
        settings: config.Settings,
        limits_table: tuple[str | None, int] = (None, 0),
        workers: int = 1,
    ) -> None:
        """`limits_table`: the file all workers count rate limits in, and this
        worker's index (store/shared.py); None: this process counts alone.
        `workers`: how many processes share the machine's memory (memory.auto_limit)
        and backend.max_sessions."""
        reseed_session_ids()
        self.settings = settings
        self.resolver = Resolver(settings.dns)
        self.store = make_store(settings.store, *limits_table)
        self.checks = build_checks(settings, self.resolver, self.store)
        self.symbols = all_known_symbols()
        pol = policy_mod.load(settings.policy, self.symbols)
        self.runner = Runner(self.checks, pol)
        # Exported at zero, so that the first event shows in increase() and a panel of
        # rare events has data before the first one.
        for result in ("ok", "failed"):
            metrics.child(metrics.CONFIG_RELOADS, result)
        for result in ("admitted", "timeout"):
            metrics.child(metrics.MESSAGE_MEMORY_WAITS, result)
        for result in ("ok", "refused", "timeout", "failed", "busy"):
            metrics.child(metrics.BACKEND_CONNECTS, result)
        self.backend = build_backend(settings, workers)
        self.listeners = [
            ListenerState(
                cfg=lc,
                tls=tls.server_context(lc, i),
                requiretls=requiretls_possible(settings),
            )
            for i, lc in enumerate(settings.listeners)
        ]
        self.svc = Services(
            settings=settings,
            runner=self.runner,
            backend=self.backend,
            is_trusted=network_matcher(settings.trusted_networks),
            is_proxy=network_matcher(settings.proxy_networks),
            is_local=RelayCheck(settings.local_domains).is_local,
            memory=MessageMemory(
                settings.limits.max_data_memory
                or auto_limit(workers, settings.limits.max_message_size),
                settings.limits.data_memory_wait,
            ),
        )
        self._size_changed()
        if isinstance(self.backend, SmtpBackend):
            self.backend.on_size = self._size_changed
        self.dmarc_reports: DmarcReports | None = None
        if settings.dmarc_reports.enabled:
            from gateway.dmarcreports.service import DmarcReports

            self.dmarc_reports = DmarcReports(settings, self.resolver, limits_table[1])
            self.svc.dmarc = self.dmarc_reports.recorder
        self.http = HttpEndpoint(self.readiness, self.store)
        self.stopping = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self.reuse_port = False
        metrics.child(metrics.BUILD, __version__).set(1)
        memory = self.svc.memory
        metrics.child(metrics.MESSAGE_MEMORY_LIMIT).set(memory.limit)
        held = metrics.child(metrics.MESSAGE_MEMORY)
        waiters = metrics.child(metrics.MESSAGE_MEMORY_WAITERS)

        def sample_memory() -> None:
            held.set(memory.counted())
            waiters.set(memory.waiting)

        metrics.sample(sample_memory)

    def _size_changed(self) -> None:
        """The largest message is ours or the backend's SIZE, whichever is smaller:
        advertising more would have the client send what the backend refuses only
        after the whole message (and a refused SIZE= left a session behind that
        refused every later transaction: forward/backend.py resets it now)."""
        size = self.settings.limits.max_message_size
        limit = self.backend.size_limit if isinstance(self.backend, SmtpBackend) else None
        if limit is not None and limit - PREFIX_ROOM < size:
            # The backend counts the header fields we add too.
            size = max(1024, limit - PREFIX_ROOM)
        if size == self.svc.max_size:
            return
        self.svc.max_size = size
        for ls in self.listeners:
            ls.ehlo_plain = ehlo_lines(self.settings, ls.cfg, False, size)
            ls.ehlo_tls = ehlo_lines(self.settings, ls.cfg, True, size)
        if limit is not None:
            logs.event("backend_size", max_message_size=size, backend_size=limit)

    # -- readiness ----------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while the gateway takes connections: until it drains. Not while the
        backend is down: an MX that is unready drops out of its load balancer, and
        senders fall to a secondary MX (which may bypass the gateway) or get no
        answer, instead of the 451 that makes them retry here. The backend's state
        is in the body, in smtp_gateway_backend_available and its alert."""
        details: dict[str, Any] = {
            "draining": self.svc.draining,
            "backend_available": self.backend.available,
        }
        dnsbl = self._dnsbl()
        if dnsbl is not None and dnsbl.health():
            details["dnsbl_zones_healthy"] = dnsbl.health()
        # Shown, never a reason to be unready (dns.Health says why).
        details["dns"] = self.resolver.health.state()
        return not self.svc.draining, details

    # -- lifecycle ------------------------------------------------------------------
    def _factory(self, ls: ListenerState) -> Any:
        svc = self.svc
        loop = asyncio.get_running_loop()

        def on_connect(stream: Stream) -> None:
            if ls.active >= ls.cfg.max_connections:
                metrics.child(metrics.CONNECTIONS, ls.cfg.name, "refused_limit").inc()
                stream.write(replies.TOO_MANY_CONNECTIONS.wire())
                stream.close()
                return
            if svc.draining:
                stream.write(replies.SHUTTING_DOWN.wire())
                stream.close()
                return
            session = Session(svc, ls, stream)
            ls.active += 1
            metrics.child(metrics.ACTIVE_CONNECTIONS, ls.cfg.name).inc()
            svc.sessions.add(session)
            # The task runs the session itself, with no wrapper coroutine: every wait
            # of a session resumes through each frame of its stack.
            task = session.task = loop.create_task(session.run())
            task.add_done_callback(lambda _t: self._closed(ls, session))

        def factory() -> Stream:
            s = Stream(loop=loop)
            s.on_connect = on_connect
            return s

        return factory

    def _closed(self, ls: ListenerState, session: Session) -> None:
        self.svc.sessions.discard(session)
        ls.active -= 1
        metrics.child(metrics.ACTIVE_CONNECTIONS, ls.cfg.name).dec()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self.backend, SmtpBackend):
            # Connected and greeted before the first client: its SIZE is known then.
            await self.backend.warm()
        for ls in self.listeners:
            c = ls.cfg
            if c.address == "::":
                # Every address, IPv6 and IPv4 (as Postfix's inet_interfaces = all):
                # asyncio would make the socket IPv6 only.
                ls.server = await loop.create_server(
                    self._factory(ls), sock=_dual_stack(c.port, self.reuse_port), backlog=1024
                )
            else:
                ls.server = await loop.create_server(
                    self._factory(ls),
                    c.address,
                    c.port,
                    backlog=1024,
                    reuse_port=self.reuse_port or None,
                )
            sock = ls.server.sockets[0].getsockname()
            logs.event(
                "listening",
                listener=c.name,
                address=sock[0],
                port=sock[1],
                tls=c.tls.value,
                proxy_protocol=c.proxy_protocol,
            )
        if self.settings.metrics.listen:
            host, port = config.split_hostport(self.settings.metrics.listen)
            await self.http.start(host, port, reuse_port=self.reuse_port)
            logs.event("metrics_listening", address=host, port=port)
        dnsbl = self._dnsbl()
        if dnsbl is not None and dnsbl.health():
            await dnsbl.health_check()  # at start: an unhealthy zone is skipped from the first mail
            interval = self.runner.policy.checks.dnsbl.health_interval
            self._health_task = asyncio.get_running_loop().create_task(dnsbl.health_loop(interval))
        loop = asyncio.get_running_loop()
        interval = self.settings.tls_reload_interval
        if interval > 0 and any(ls.tls is not None for ls in self.listeners):
            self._tls_task = loop.create_task(self._watch_certs(interval))
        self._metrics_task = loop.create_task(self._flush_metrics())
        if self.dmarc_reports is not None:
            self.dmarc_reports.start()
        # What start set (certificate expiry, series exported at zero) is visible to
        # the first scrape, not a flush interval later.
        metrics.flush()
        if self.settings.policy_reload_interval > 0:
            self._policy_task = loop.create_task(
                self._watch_policy(self.settings.policy_reload_interval)
            )
        logs.event(
            "ready",
            version=__version__,
            hostname=self.settings.hostname,
            backend=",".join(self.settings.backend.url),
            # This process's share, as worked out when the config leaves it open.
            max_data_memory=self.svc.memory.limit,
        )

    def _dnsbl(self) -> DnsblCheck | None:
        return next((c for c in self.checks if isinstance(c, DnsblCheck)), None)

    def reload(self) -> bool:
        """Re-read the policy; a bad one is refused and the old one stays."""
        try:
            pol = policy_mod.load(self.settings.policy, self.symbols)
        except config.ConfigError as e:
            metrics.child(metrics.CONFIG_RELOADS, "failed").inc()
            logs.failure("reload_failed", error=str(e))
            return False
        self.runner.swap_policy(pol)
        metrics.child(metrics.CONFIG_RELOADS, "ok").inc()
        logs.event("reloaded", policy=self.settings.policy)
        return True

    async def _watch_certs(self, interval: float) -> None:
        """Renewed certificates (cert-manager, ACME, a Secret's symlink swap) are
        picked up for new sessions; a broken pair is logged and the old one kept."""
        while True:
            await asyncio.sleep(interval)
            for ls in self.listeners:
                if ls.tls is not None:
                    ls.tls.reload_if_changed()

    async def _watch_policy(self, interval: float) -> None:
        """A changed policy file or table (a ConfigMap update swaps a symlink) reloads
        the policy as SIGHUP does; a broken one is refused, logged, and not retried
        until it changes again."""
        seen = config.file_signature(self.runner.policy.files)
        while True:
            await asyncio.sleep(interval)
            now = config.file_signature(self.runner.policy.files)
            if now != seen:
                seen = now
                self.reload()
                seen = config.file_signature(self.runner.policy.files)

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_INTERVAL)
            metrics.flush()

    async def drain(self) -> None:
        """Stop accepting; let transactions finish; then 421 4.3.2 whatever is left."""
        svc = self.svc
        svc.draining = True
        logs.event("draining", sessions=len(svc.sessions), timeout=self.settings.drain_timeout)
        for ls in self.listeners:
            if ls.server is not None:
                ls.server.close()
        for s in list(svc.sessions):
            if s.idle and s.task is not None:
                s.task.cancel()
        pending = [s.task for s in svc.sessions if s.task is not None]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.settings.drain_timeout)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        for task in (self._health_task, self._tls_task, self._policy_task, self._metrics_task):
            if task is not None:
                task.cancel()
        if self.dmarc_reports is not None:
            await self.dmarc_reports.stop()  # what is buffered goes to the store first
        await self.backend.close()
        await self.store.close()
        await self.http.close()
        metrics.flush()
        logs.event("stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Handlers first: `ready` is logged by start(), and a SIGHUP sent right after
        # it must reload, not kill the process (SIGHUP's default action).
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self.stopping.wait()
        await self.drain()


def _dual_stack(port: int, reuse_port: bool) -> socket.socket:
    """A listening socket on [::]:port that takes IPv4 clients too (as ::ffff:a.b.c.d,
    which the session names a.b.c.d)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
