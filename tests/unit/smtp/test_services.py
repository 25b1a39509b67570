"""What the sessions of a process share (gateway/smtp/services.py): ids unique across
workers, and the EHLO capabilities each listener offers."""

from __future__ import annotations

import re

from gateway import config
from gateway.smtp import services
from gateway.smtp.services import ehlo_lines, new_session_id, requiretls_possible


def caps(settings: config.Settings, listener: config.Listener, tls: bool) -> list[str]:
    return ehlo_lines(settings, listener, tls, 1000).decode().split("\r\n")[:-1]


def test_session_ids_are_unique_and_a_worker_gets_its_own_prefix() -> None:
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)
    prefix = ids[0][:6]
    seen = {prefix}
    for _ in range(3):  # a 1 in 16 million chance each of drawing the same again
        services.reseed_session_ids()
        seen.add(new_session_id()[:6])
    assert len(seen) > 1


def test_ehlo_offers_starttls_only_before_tls_and_the_size_it_takes() -> None:
    settings = config.Settings()
    plain = config.Listener(tls=config.TlsMode.NONE)
    starttls = plain.model_copy(update={"tls": config.TlsMode.STARTTLS})
    assert caps(settings, plain, False) == [
        "250-PIPELINING",
        "250-SIZE 1000",
        "250-8BITMIME",
        "250-SMTPUTF8",
        "250-DSN",
        "250 ENHANCEDSTATUSCODES",
    ]
    assert caps(settings, starttls, False)[-2:] == ["250-ENHANCEDSTATUSCODES", "250 STARTTLS"]
    assert "250 STARTTLS" not in caps(settings, starttls, True)


def test_requiretls_is_promised_only_over_a_verified_tls_next_hop() -> None:
    """RFC 8689: a hop that may go without TLS cannot carry the promise on."""
    required = config.Settings.model_validate(
        {"backend": {"url": ["smtp://127.0.0.1:25"], "tls": "required"}}
    )
    opportunistic = config.Settings.model_validate(
        {"backend": {"url": ["smtp://127.0.0.1:25"], "tls": "opportunistic"}}
    )
    assert requiretls_possible(required) and not requiretls_possible(opportunistic)
    assert not requiretls_possible(config.Settings())  # the embedded maildir
    # (model_copy: a STARTTLS listener validated would need its certificate files)
    listener = config.Listener(tls=config.TlsMode.NONE).model_copy(
        update={"tls": config.TlsMode.STARTTLS}
    )
    assert caps(required, listener, True)[-1] == "250 REQUIRETLS"
    assert "250-REQUIRETLS" not in caps(required, listener, False)
    assert all("REQUIRETLS" not in c for c in caps(opportunistic, listener, True))
