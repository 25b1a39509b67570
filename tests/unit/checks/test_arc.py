"""The ARC check (gateway/checks/arc.py): a chain's status and sealer recorded, keys
from a dict resolver; a key that cannot be fetched now is a temperror, never a fail.
(The validation itself agrees with dkimpy: test_arcverify.py.)"""

from __future__ import annotations

import dkim

from gateway.checks.arc import ArcCheck, ArcOptions
from gateway.context import Context
from gateway.dns import DnsAnswer
from gateway.facts import ArcFacts
from tests.support.dkimkeys import rsa_key
from tests.unit.checks.offloop import run_at_data
from tests.unit.fakes import TIMEOUT, DictResolver, txt

KEY = rsa_key(1024)
KEY_NAME = ("arc._domainkey.list.test", "TXT")
MSG = (
    b"From: Alice <alice@signed.test>\r\nTo: list@list.test\r\nSubject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 08:00:00 +0000\r\nMessage-ID: <a1@signed.test>\r\n\r\n"
    b"Hello list,\r\n"
)


def sealed(message: bytes = MSG) -> bytes:
    """The message as the list at list.test seals it (one ARC set)."""
    ar = b"Authentication-Results: list.test; spf=pass smtp.mailfrom=signed.test\r\n"
    sets = dkim.arc_sign(ar + message, b"arc", b"list.test", KEY.private, b"list.test")
    return b"".join(sets) + ar + message


def run(zone: dict[tuple[str, str], DnsAnswer], message: bytes) -> tuple[str, Context, bool]:
    """The symbol, the context, and whether the check answered at once (no await)."""
    (symbol,), ctx, at_once = run_at_data(ArcCheck(DictResolver(zone)), message)
    return symbol, ctx, at_once


def test_an_unsealed_message_is_none_at_once_without_a_remote_ip() -> None:
    symbol, ctx, at_once = run({}, MSG)
    assert (symbol, at_once) == ("arc.none", True)
    assert ctx.facts.arc == ArcFacts("none", None)
    [res] = ctx.auth
    assert (res.method, res.result, res.props) == ("arc", "none", {})


def test_a_valid_chain_passes_and_names_its_sealer() -> None:
    symbol, ctx, at_once = run({KEY_NAME: txt(KEY.dns)}, sealed())
    assert symbol == "arc.pass" and not at_once  # its key had to be fetched
    assert ctx.facts.arc == ArcFacts("pass", "list.test")
    [res] = ctx.auth
    assert res.props == {"smtp.remote-ip": "192.0.2.1"}  # RFC 8617 6: for the next sealer


def test_a_chain_over_an_altered_body_fails() -> None:
    symbol, ctx, _ = run({KEY_NAME: txt(KEY.dns)}, sealed().replace(b"Hello list", b"Hello all"))
    assert symbol == "arc.fail" and ctx.facts.arc is not None
    assert ctx.facts.arc.result == "fail"


def test_a_seal_key_that_times_out_is_a_temperror() -> None:
    symbol, ctx, _ = run({KEY_NAME: TIMEOUT}, sealed())
    assert symbol == "arc.temperror"
    assert "key lookup" in ctx.auth[0].reason


def test_a_seal_key_that_does_not_exist_fails_the_chain() -> None:
    symbol, _, _ = run({}, sealed())
    assert symbol == "arc.fail"


def test_arc_has_no_options_but_its_switch() -> None:
    check = ArcCheck(DictResolver({}))
    try:
        assert check.configured(ArcOptions()) is check
    finally:
        check.close()
