"""Where TLS is required by policy (gateway/checks/tlspolicy.py): chosen senders,
client networks and recipient domains; a session with TLS is never refused."""

from __future__ import annotations

from gateway.address import parse_path
from gateway.checks.tlspolicy import REQUIRED, TlsPolicyCheck, TlsPolicyOptions
from gateway.context import Context
from gateway.vocab import Stage

OPTIONS = TlsPolicyOptions.model_validate(
    {
        "require_tls_from": ["partner.test", "*.bank.test"],
        "require_tls_networks": ["198.51.100.0/24"],
        "require_tls_to": ["secure.example.test"],
    }
)


def ctx(ip: str = "192.0.2.1", sender: str = "a@other.test", tls: str | None = None) -> Context:
    c = Context("s", ip, 1, "mx", tls_version=tls)
    c.mail_from = parse_path(f"<{sender}>", allow_null=True)
    return c


def test_configured_is_a_new_check_and_the_old_one_is_unchanged() -> None:
    bare = TlsPolicyCheck()
    check = bare.configured(OPTIONS)
    assert check is not bare
    assert bare.active_stages() == set()  # nothing configured: never run
    assert check.active_stages() == {Stage.MAIL, Stage.RCPT}
    only_to = bare.configured(TlsPolicyOptions(require_tls_to=["x.test"]))
    assert only_to.active_stages() == {Stage.RCPT}


def test_a_sender_domain_or_its_subdomains_need_tls_and_the_reply_says_which() -> None:
    check = TlsPolicyCheck().configured(OPTIONS)
    for sender, why in (("a@partner.test", "partner.test"), ("a@mx.bank.test", "mx.bank.test")):
        c = ctx(sender=sender)
        assert check.run(Stage.MAIL, c) == (REQUIRED,)
        assert c.details[REQUIRED] == why
    assert check.run(Stage.MAIL, ctx(sender="a@bank.test")) == ()  # *. is subdomains only
    assert check.run(Stage.MAIL, ctx(sender="a@other.test")) == ()
    assert check.run(Stage.MAIL, ctx(sender="")) == ()  # the null sender


def test_a_client_network_needs_tls_whatever_the_sender() -> None:
    check = TlsPolicyCheck().configured(OPTIONS)
    c = ctx(ip="198.51.100.9")
    assert check.run(Stage.MAIL, c) == (REQUIRED,)
    assert c.details[REQUIRED] == "your network"


def test_a_recipient_domain_needs_tls_at_rcpt() -> None:
    check = TlsPolicyCheck().configured(OPTIONS)
    c = ctx()
    c.rcpt = parse_path("<ceo@secure.example.test>")
    assert check.run(Stage.RCPT, c) == (REQUIRED,)
    assert c.details[REQUIRED] == "secure.example.test"
    c.rcpt = parse_path("<ceo@example.test>")
    assert check.run(Stage.RCPT, c) == ()


def test_with_tls_nothing_is_required() -> None:
    check = TlsPolicyCheck().configured(OPTIONS)
    c = ctx(ip="198.51.100.9", sender="a@partner.test", tls="TLSv1.3")
    c.rcpt = parse_path("<ceo@secure.example.test>")
    assert check.run(Stage.MAIL, c) == () and check.run(Stage.RCPT, c) == ()
    assert REQUIRED not in c.details
