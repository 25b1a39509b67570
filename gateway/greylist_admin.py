"""`smtp-gateway greylist show|allow|reset CLIENT [SENDER [RECIPIENT]]`.

CLIENT is an IP address (its network, as the policy groups them), a network in
CIDR form, or `spf:DOMAIN` (the triplets keyed by an SPF-authenticated domain).
SENDER and RECIPIENT are normalised as the check does (greylist_keys.py), so the
operator types the addresses as they appear in a log line: `bounce-1234@list`
finds `bounce-#@list`. An empty SENDER ('' or '<>') is the null sender.

- show: the client network's auto-whitelist entry and the triplets under what was
  given (with a sender and no client origin of its own, the SPF-keyed triplets of
  the sender's domain as well);
- allow: a triplet whitelisted now for `ttl` (both its network and, when
  `spf_origin` is on, its SPF-domain form: whichever way the next attempt is
  keyed, it passes); with CLIENT alone, the network auto-whitelisted;
- reset: forget what show would list.

As `smtp-gateway ratelimit` (admin.py): with Redis the command talks to Redis; in memory
it asks the running gateway's loopback-only endpoint (any worker: they share one
table).
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from gateway import admin, config
from gateway.address import AddressError, parse_path
from gateway.checks.greylist import GreylistOptions, params_of
from gateway.checks.greylist_keys import recipient_key, sender_key
from gateway.store.greylist import GreyEntry, Params


class Target:
    """What an operator named, as the store's keys (without `grey:`)."""

    def __init__(
        self, client: str, sender: str | None, recipient: str | None, opts: GreylistOptions
    ) -> None:
        self.network: str | None = None
        if client.lower().startswith("spf:"):
            origins = [client.lower().rstrip(".")]
        else:
            try:
                net = ipaddress.ip_network(client, strict=False)
            except ValueError:
                raise config.ConfigError(
                    f"{client!r}: give an IP address, a network or spf:DOMAIN"
                ) from None
            prefix = opts.network_prefix_v4 if net.version == 4 else opts.network_prefix_v6
            if net.prefixlen > prefix:
                net = net.supernet(new_prefix=prefix)
            self.network = str(net)
            origins = [self.network]
        self.sender = None if sender is None else _sender(sender)
        self.recipient = None if recipient is None else _recipient(recipient)
        if self.sender is not None and self.network is not None and opts.spf_origin:
            domain = self.sender.rpartition("@")[2]
            if domain:
                origins.append(f"spf:{domain}")
        self.origins = origins

    def queries(self) -> list[tuple[str, bool]]:
        """(key or prefix, exact) of every entry named."""
        out = []
        if self.network is not None and self.sender is None:
            out.append((f"n:{self.network}", True))
        for o in self.origins:
            if self.recipient is not None:
                out.append((f"t:{o}|{self.sender}|{self.recipient}", True))
            elif self.sender is not None:
                out.append((f"t:{o}|{self.sender}|", False))
            else:
                out.append((f"t:{o}|", False))
        return out

    def allowed_keys(self) -> list[str]:
        if self.recipient is None:
            return [f"n:{self.network}"]
        return [f"t:{o}|{self.sender}|{self.recipient}" for o in self.origins]


def _sender(text: str) -> str:
    if text in ("", "<>"):
        return sender_key(None)
    try:
        return sender_key(parse_path(f"<{text.strip('<>')}>"))
    except AddressError as e:
        raise config.ConfigError(f"{text!r}: not an address ({e})") from None


def _recipient(text: str) -> str:
    try:
        return recipient_key(parse_path(f"<{text.strip('<>')}>"))
    except AddressError as e:
        raise config.ConfigError(f"{text!r}: not an address ({e})") from None


# -- talking to the store -------------------------------------------------------------


async def _via_redis(
    settings: config.Settings, action: str, target: Target, p: Params
) -> dict[str, Any]:
    from gateway.store import greylist_for, make_store

    store = make_store(settings.store)
    grey = greylist_for(store)
    try:
        if action == "allow":
            for key in target.allowed_keys():
                await grey.allow(key, p)
            return {}
        if action == "reset":
            n = 0
            for prefix, exact in target.queries():
                n += await grey.reset(prefix, exact)
            return {"deleted": n}
        entries: list[GreyEntry] = []
        for prefix, exact in target.queries():
            entries += await grey.entries(prefix, exact)
        return {"entries": [e._asdict() for e in entries]}
    finally:
        await store.close()


async def _via_http(
    settings: config.Settings, action: str, target: Target, p: Params
) -> dict[str, Any]:
    host, port = admin.loopback(settings, "the in-memory greylist")
    if action == "allow":
        for key in target.allowed_keys():
            q = {"key": key, "ttl": p.ttl, "after": p.awl_after, "awl_ttl": p.awl_ttl}
            await admin.request(host, port, "POST", "/greylist/allow", q)
        return {}
    out: dict[str, Any] = {"deleted": 0, "entries": []}
    for prefix, exact in target.queries():
        q = {"key": prefix, "exact": int(exact)}
        if action == "reset":
            answer = await admin.request(host, port, "POST", "/greylist/reset", q)
            out["deleted"] += answer["deleted"]
        else:
            out["entries"] += (await admin.request(host, port, "GET", "/greylist", q))["entries"]
    return out


# -- what the operator reads ------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration as an operator reads it."""
    s = max(0.0, seconds)
    if s < 600:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def shown(key: str) -> str:
    """A key as an operator's terminal shows it: the sender and recipient are the
    client's to choose, so anything but printable ASCII is escaped (a right-to-left
    override would reorder the line; a zero-width space or a Cyrillic letter would
    pass for a real address)."""
    if key.isascii() and key.isprintable():
        return key
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode() for c in key)


def describe(e: GreyEntry, p: Params) -> str:
    e = e._replace(key=shown(e.key))
    if e.state == "network":
        if p.awl_after <= 0:
            status = "auto-whitelisting is off"
        elif e.passes >= p.awl_after:
            status = "auto-whitelisted"
        else:
            status = f"not yet auto-whitelisted ({p.awl_after} needed)"
        return f"{e.key}: {e.passes} pass(es), {status}, forgotten in {span(e.left)}"
    if e.state == "pending":
        wait = p.delay - e.age
        when = f"a retry passes in {span(wait)}" if wait > 0 else "a retry passes now"
        return (
            f"{e.key}: pending, first attempt {span(e.age)} ago, {when},"
            f" forgotten in {span(e.left)}"
        )
    return f"{e.key}: whitelisted, passed {span(e.age)} ago, expires in {span(e.left)}"


def run(
    action: str,
    client: str,
    sender: str | None,
    recipient: str | None,
    config_path: str | None,
) -> int:
    settings, pol = admin.load(config_path)
    opts = pol.checks.greylist
    target = Target(client, sender, recipient, opts)
    p = params_of(opts)
    if action == "allow":
        if sender is not None and recipient is None:
            raise config.ConfigError("allow: give CLIENT alone (its network) or a whole triplet")
        if recipient is None and target.network is None:
            raise config.ConfigError("allow: an spf:DOMAIN origin needs a whole triplet")
        if recipient is None and p.awl_after <= 0:
            raise config.ConfigError(
                "allow CLIENT: checks.greylist.auto_whitelist.after is 0 (off), so a network"
                " entry would not be honoured; list the network in checks.dnsbl.allow_networks"
            )
    via = _via_redis if settings.store.redis_url else _via_http
    result = asyncio.run(via(settings, action, target, p))
    if action == "allow":
        for key in target.allowed_keys():
            print(f"{key}: allowed")
        return 0
    if action == "reset":
        n = result["deleted"]
        print(f"{client}: reset ({n} entr{'y' if n == 1 else 'ies'} removed)")
        return 0
    entries = sorted({GreyEntry(**e) for e in result["entries"]})
    if not entries:
        print(f"{client}: nothing known (never seen, or expired)")
    for e in entries:
        print(describe(e, p))
    return 0
