"""DKIM keys made per test run, and signing with dkimpy (never shipped keys)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


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
