"""The greylist's keys: what makes two delivery attempts "the same" triplet.

A legitimate MTA's retry must find its first attempt's entry, though parts of what
it sends change between attempts:

- the client address: large senders retry from another address of a pool, so the
  client is its network (/24 for IPv4, /64 for IPv6: `network_prefix_v4`/`_v6`);
  and when SPF passed, the origin is the SPF-authenticated domain itself
  (`spf:<domain>`), so a retry from any address that domain's SPF record
  authorises (another pool, another provider's network) is the same triplet.
  Why SPF and not the domain's MX hosts: SPF is where a domain publishes the
  servers it sends from, and the SPF check has evaluated it already; MX hosts are
  where it receives, often not where it sends from, and would cost lookups of
  their own for every new triplet;
- the sender: bounce-handling schemes put a per-message or per-day tag in the
  local part, so the sender is normalised (`sender_key`);
- the recipient is the recipient, compared without case.

Every part is bounded by the SMTP path limits (256 octets an address), so a key
is at most about 560 characters.
"""

from __future__ import annotations

import re

from gateway.address import Address
from gateway.facts import SpfFacts
from gateway.net import network_of
from gateway.store.greylist import NETWORK, TRIPLET

NULL_SENDER = "<>"

# SRS (Shevek's scheme, as gateway/rewrite/srs.py writes it):
#   SRS0=HHH=TT=orig.domain=orig-local@forwarder
#   SRS1=HHH=first.forwarder==HHH=TT=orig.domain=orig-local@forwarder
_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)", re.IGNORECASE)
_SRS1 = re.compile(r"srs1[=+-][^=]*=[^=]*==[^=]*=[^=]*=([^=]+)=(.+)", re.IGNORECASE)
# BATV (draft-levine-smtp-batv): prvs=TAG=local; Microsoft's msprvs1=TAG=local,
# and btv1==TAG==local.
_BATV = re.compile(r"(?:prvs|msprvs\d*|btv1)=+[^=]*=+(.+)", re.IGNORECASE)
# VERP-like per-message parts: a run of digits (bounce-12345), or a run of 10 or
# more letters and digits holding a digit (a hash: bounce-a8f3k29xq0b1).
_TOKEN = re.compile(r"[a-z0-9]+")


def _token(m: re.Match[str]) -> str:
    t = m.group()
    if t.isdigit() or (len(t) >= 10 and any(c.isdigit() for c in t)):
        return "#"
    return t


def sender_key(sender: Address | None) -> str:
    """The sender as the greylist compares it: lower case; an SRS address as the
    original sender it carries (a forwarder's retry may carry a new day's stamp and
    hash); a BATV address without its tag (new for every message); no +tag; runs
    of digits, and long tokens holding digits, made `#` (VERP and list bounce
    addresses number each message: bounce-1234@, bounce-1235@)."""
    if sender is None or sender.is_null:
        return NULL_SENDER
    local, domain = sender.local.lower(), sender.domain.lower()
    for pattern in (_SRS1, _SRS0):
        m = pattern.fullmatch(local)
        if m is not None:
            local, domain = m.group(2), m.group(1)
            break
    m = _BATV.fullmatch(local)
    if m is not None:
        local = m.group(1)
    local = local.split("+", 1)[0] or local
    local = _TOKEN.sub(_token, local)
    return f"{local}@{domain}"


def recipient_key(rcpt: Address) -> str:
    return f"{rcpt.local.lower()}@{rcpt.domain.lower()}"


def network_key(ip: str, v4: int = 24, v6: int = 64) -> str:
    """The auto-whitelist entry of the client's network."""
    return f"{NETWORK}{network_of(ip, v4, v6)}"


def origin(ip: str, spf: SpfFacts | None, v4: int = 24, v6: int = 64, use_spf: bool = True) -> str:
    """Where the attempt comes from: `spf:<domain>` when SPF passed for the sender
    (the HELO name for a bounce), else the client's network."""
    if use_spf and spf is not None and spf.result == "pass" and spf.domain:
        return f"spf:{spf.domain.lower().rstrip('.')}"
    return network_of(ip, v4, v6)


def triplet_key(origin: str, sender: str, recipient: str) -> str:
    return f"{TRIPLET}{origin}|{sender}|{recipient}"
