"""DKIM keys made per test run, and signing with dkimpy (never shipped keys)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import dkim
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


@dataclass(frozen=True)
class Key:
    kind: str  # "rsa" or "ed25519"
    private: bytes  # what dkim.sign wants
    dns: str  # the TXT record value for <selector>._domainkey.<domain>


def rsa_key(bits: int = 2048) -> Key:
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key("rsa", pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


def ed25519_key() -> Key:
    sk = nacl.signing.SigningKey.generate()
    priv = base64.b64encode(bytes(sk))
    pub = base64.b64encode(bytes(sk.verify_key)).decode()
    return Key("ed25519", priv, f"v=DKIM1; k=ed25519; p={pub}")


def sign(
    message: bytes,
    key: Key,
    domain: str,
    selector: str,
    *,
    include: list[bytes] | None = None,
    length: bool = False,
) -> bytes:
    """The message with a DKIM-Signature header prepended."""
    sig = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        signature_algorithm=b"ed25519-sha256" if key.kind == "ed25519" else b"rsa-sha256",
        include_headers=include or [b"from", b"to", b"subject", b"date", b"message-id"],
        length=length,
    )
    return bytes(sig) + message


def sign_simple_by_hand(
    message: bytes, key: Key, domain: str, selector: str, h: str, tags: str = ""
) -> bytes:
    """An rsa-sha256, c=simple/simple signature over the fields named in `h`, made by
    hand: dkimpy refuses to sign what a verifier must refuse (h= without From), and a
    test of that refusal needs such a signature; dkimpy also cannot write some tag
    forms RFC 6376 allows (`tags`, put before b=, as "i=u=40x.test; "). Each name in
    h= takes its field from the bottom up (RFC 6376 5.4.2); the message's body must
    already be canonical."""
    head, body = message.split(b"\r\n\r\n", 1)
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    taken: list[bytes] = []
    for name in h.split(":"):
        for f in reversed(fields):
            if f.split(b":", 1)[0].strip().lower() == name.encode() and f not in taken:
                taken.append(f)
                break
    bh = base64.b64encode(hashlib.sha256(body).digest()).decode()
    value = f" v=1; a=rsa-sha256; c=simple/simple; d={domain}; s={selector}; h={h}; bh={bh}; "
    value += f"{tags}b="
    signed = b"".join(f + b"\r\n" for f in taken) + b"DKIM-Signature:" + value.encode()
    private = serialization.load_pem_private_key(key.private, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    b = private.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    return b"DKIM-Signature:" + value.encode() + base64.b64encode(b) + b"\r\n" + message


def arc_seal_ed25519(message: bytes, key: Key, domain: str, selector: str = "arc") -> bytes:
    """`message` with an ARC set i=1 signed with ed25519-sha256 (RFC 8617 with RFC
    8463's algorithm), made by hand: dkimpy's ARC signer takes RSA keys only. The
    first field of `message` must be the sealer's own Authentication-Results."""
    from gateway.checks import dkimrsa

    assert key.kind == "ed25519"
    sk = nacl.signing.SigningKey(base64.b64decode(key.private))
    ar, _, rest = message.partition(b"\r\n")
    results = ar.split(b";", 1)[1].strip()
    aar = b"ARC-Authentication-Results: i=1; " + domain.encode() + b"; " + results + b"\r\n"
    body = rest.split(b"\r\n\r\n", 1)[1]
    bh = base64.b64encode(hashlib.sha256(dkimrsa.relaxed_body(body)).digest())
    tags = f"i=1; a=ed25519-sha256; c=relaxed/relaxed; d={domain}; s={selector}; h=from:subject"
    ams_value = f" {tags}; bh={bh.decode()}; b=".encode()

    def signed(
        value: bytes, headers: list[tuple[bytes, bytes]], include: list[bytes], name: bytes
    ) -> bytes:
        h = hashlib.sha256()
        dkimrsa.hash_headers(h, True, headers, include, (name, value))
        return value + base64.b64encode(sk.sign(h.digest()).signature)

    d = dkimrsa.parse(message, crlf_clean=True)
    ams_value = signed(ams_value, d.headers, [b"from", b"subject"], b"ARC-Message-Signature")
    ams = b"ARC-Message-Signature:" + ams_value + b"\r\n"
    seal_value = f" i=1; a=ed25519-sha256; cv=none; d={domain}; s={selector}; b=".encode()
    arc_fields = [
        (b"ARC-Authentication-Results", aar.split(b":", 1)[1]),
        (b"ARC-Message-Signature", ams_value + b"\r\n"),
    ]
    seal_value = signed(
        seal_value,
        arc_fields,
        [b"arc-authentication-results", b"arc-message-signature"],
        b"ARC-Seal",
    )
    return b"ARC-Seal:" + seal_value + b"\r\n" + ams + aar + message
