"""DKIM verification with the `cryptography` package (OpenSSL), dkimpy for the rest.

dkimpy's RSA is pure Python: about 0.45 ms per verify, more than the whole CPU
budget of a message at the benchmark's rates. OpenSSL does the same in ~25 µs.
dkimpy stays the authority for body canonicalisation and the canonicalisation
policy, through its public helpers. Its other steps are redone here because they
dominated the cost, each exactly as dkimpy does it: the header-field parse of a
CRLF message (dkimpy splits the whole message with a regex), the tag-list parse
(a regex per tag), the signature-field validation (patterns compiled per call)
and verify_headerprep around them, header selection (names lowered at every
step), relaxed canonicalisation of only the signed fields, and the removal of
the b= value (dkimpy's pattern backtracks). Tests hold the whole verifier and
each of those steps against dkimpy, on good, tampered and odd input. The
places where the validation differs on purpose are named at the function.

Keys are parsed once per distinct TXT record (an LRU), not once per message.
ed25519 keys (RFC 8463) are verified here too, by OpenSSL, so that every
signature gets the same parsing, validation and canonicalisation.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import (
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
    Relaxed,
    correct_empty_body,
    strip_trailing_lines,
)
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList

from gateway.wire import number

# The hash objects OpenSSL needs for a pre-hashed verify, by the a= tag.
_PREHASHED = {
    b"rsa-sha256": utils.Prehashed(hashes.SHA256()),
    # RFC 8301 forbids it and DkimCheck refuses it before verifying; kept so that this
    # function stays dkimpy's verify, which the differential tests hold it to.
    b"rsa-sha1": utils.Prehashed(hashes.SHA1()),
}
_MISSING: Any = object()
ED25519_BITS = 256
MIN_BITS = 1024  # dkimpy's default minkey (RFC 8301: 1024 is the floor)
# RFC 8301 3.2: verifiers must handle 1024 to 4096 bits and may take more. A verify
# costs the square of the size (16384 bits: 64 times a 2048-bit one), so a sender
# cannot make each message dear by signing with a huge key; rspamd's limit too.
MAX_BITS = 8192


@dataclass(frozen=True, slots=True)
class PublicKey:
    public: rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    bits: int  # an RSA key's size; 256 for ed25519
    tlsrpt: bool  # s=tlsrpt: a key only for TLS reports (RFC 8460), never for mail
    # The RSA public exponent's size: 17 for the 65537 every signer uses; a key a
    # sender publishes may have one of nearly its modulus's size (OpenSSL allows it
    # up to 3072 bits), and a verification then costs that many times more.
    exponent_bits: int = 17


class KeyRevoked(dkim.KeyFormatError):  # type: ignore[misc]  # dkimpy is untyped
    """An empty p=: the key was revoked (RFC 6376 3.6.1), a fail, not a permerror."""


class KeyCache:
    """TXT record -> parsed key (or the dkimpy exception it raises), bounded LRU.

    Every key problem is decided here, once per record: revoked, malformed, a
    type dkimpy does not know. Messages signed with a cached key pay nothing.

    Locked: large messages are verified in worker threads that share it.
    """

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._keys: OrderedDict[bytes, PublicKey | dkim.DKIMException] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, name: str, record: bytes) -> PublicKey:
        """The key in `record` (RSA or ed25519). Raises KeyRevoked, or
        dkim.KeyFormatError as dkimpy's own key loader would."""
        with self._lock:
            hit = self._keys.get(record, _MISSING)
            if hit is not _MISSING:
                self._keys.move_to_end(record)
        if hit is _MISSING:
            try:
                hit = _parse(name, record)
            except dkim.DKIMException as e:
                hit = e
            with self._lock:
                self._keys[record] = hit
                if len(self._keys) > self.size:
                    self._keys.popitem(last=False)
        if isinstance(hit, dkim.DKIMException):
            raise hit
        key: PublicKey = hit
        return key

    def bits(self, name: str, record: bytes) -> int:
        """The key's size for the cost of verifying with it: the size of an RSA key of
        the common exponent (65537) that costs as much. An RSA key's own, grown with
        the square root of its exponent's size (the cost grows with the exponent's
        bits, and with the square of the size); an ed25519 key costs about what
        RSA-2048 does; an unusable key, 0."""
        try:
            key = self.get(name, record)
        except dkim.DKIMException:
            return 0
        if key.bits == ED25519_BITS:
            return 2048
        return int(key.bits * math.sqrt(max(1.0, key.exponent_bits / 17)))


@functools.lru_cache(maxsize=1024)
def _key_terms(record: bytes) -> tuple[frozenset[bytes] | None, frozenset[bytes], bool]:
    """A key record's h= (hash algorithms allowed; None: any), s= (service types)
    and whether t= has the s flag. Cached: a record is parsed by KeyCache first, so
    its tags are valid by the time this is asked."""
    tags = parse_tags(record)

    def terms(tag: bytes) -> frozenset[bytes]:
        return frozenset(t.strip().lower() for t in tags[tag].split(b":"))

    hashes = terms(b"h") if b"h" in tags else None
    services = terms(b"s") if b"s" in tags else frozenset({b"*"})
    return hashes, services, b"s" in (terms(b"t") if b"t" in tags else frozenset())


def key_use_error(record: bytes, sig: dict[bytes, bytes]) -> str | None:
    """Why RFC 6376 3.6.1 / 6.1.2 forbid using this key for this signature, if they do.

    dkimpy checks none of these when it verifies: a key for another service (s=), a
    key that allows other hash algorithms only (h=), a strict key (t=s) for a
    signature whose i= names a subdomain of d=. Each is a PERMFAIL of the signature.
    """
    hashes, services, strict = _key_terms(record)
    if not services & {b"*", b"email", b"tlsrpt"}:  # tlsrpt: refused in verify, as dkimpy
        return f"key is not for email (s={b':'.join(sorted(services)).decode(errors='replace')})"
    algorithm = sig.get(b"a", b"")
    if hashes is not None and algorithm.rpartition(b"-")[2].lower() not in hashes:
        return f"key does not allow {algorithm.decode(errors='replace')} (h=)"
    if strict and b"i" in sig:
        i_domain = auid(sig).rpartition(b"@")[2].lower().rstrip(b".")
        if i_domain != sig.get(b"d", b"").lower().rstrip(b"."):
            return "key is strict (t=s) and i= names a subdomain of d="
    return None


def _parse(name: str, record: bytes) -> PublicKey:
    """RFC 6376 3.6.1 key record, with dkimpy's `evaluate_pk` semantics."""
    if not record:
        raise dkim.KeyFormatError(f"missing public key: {name}")
    try:
        tags = parse_tags(record)
    except InvalidTagValueList as e:
        raise dkim.KeyFormatError(str(e)) from None
    if tags.get(b"p", None) == b"":
        raise KeyRevoked("key revoked")
    if b"v" in tags and tags[b"v"] != b"DKIM1":
        raise dkim.KeyFormatError("bad version")
    kind = tags.get(b"k", b"rsa")
    service = tags.get(b"s", b"*")
    if kind == b"ed25519":
        try:  # what dkimpy would refuse is refused here, with its words
            dkim.evaluate_pk(name.encode(), record)
            raw = base64.b64decode(tags[b"p"])
            return PublicKey(
                ed25519.Ed25519PublicKey.from_public_bytes(raw), ED25519_BITS, service == b"tlsrpt"
            )
        except dkim.KeyFormatError:
            raise
        except Exception as e:
            raise dkim.KeyFormatError(str(e)) from None
    if kind != b"rsa":
        raise dkim.KeyFormatError(f"unknown algorithm in k= tag: {kind!r}")
    if b"p" not in tags:
        raise dkim.KeyFormatError(f"incomplete RSA public key: {record!r}")
    try:
        der = base64.b64decode(tags[b"p"])
        public = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, TypeError) as e:
        raise dkim.KeyFormatError(f"could not parse RSA public key: {e}") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise dkim.KeyFormatError("k=rsa but p= is not an RSA key")
    if public.key_size > MAX_BITS:
        raise dkim.KeyFormatError(f"public key too large: {public.key_size} bits")
    exponent = public.public_numbers().e
    return PublicKey(public, public.key_size, service == b"tlsrpt", exponent.bit_length())


LOG = logging.getLogger("dkimpy")  # passed in: dkimpy looks its logger up per object


def parse(message: bytes, *, crlf_clean: bool) -> Any:
    """dkim.DKIM for `message`, parsed as dkimpy would.

    dkimpy splits the whole message into lines with a regex and joins the body
    back (1 ms per 100 KB). When every line end is CRLF (the gateway guarantees
    it for what it received: bare CR/LF is refused or normalised first), the
    same result is the header section parsed by dkimpy plus the rest as it is.
    """
    if not crlf_clean or not message:
        return dkim.DKIM(message, logger=LOG)
    if message.startswith(b"\r\n"):  # no header fields: the body starts at once
        end = 2
    else:
        end = message.find(b"\r\n\r\n")
        end = len(message) if end < 0 else end + 4
    d = dkim.DKIM(logger=LOG)
    d.headers = _header_fields(message[:end])
    d.body = message[end:]
    return d


_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _header_fields(head: bytes) -> list[list[bytes]]:
    """dkimpy's rfc822_parse of a CRLF header section (its pattern compiled once)."""
    headers: list[list[bytes]] = []
    more: dict[int, list[bytes]] = {}  # continuation lines per field, joined once below
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            # Appending to the bytes each time copied the field each time: quadratic
            # in a field of 60,000 continuation lines.
            if not headers:  # IndexError, as dkimpy raises for it
                raise IndexError("list index out of range")
            more.setdefault(len(headers) - 1, []).append(line + b"\r\n")
            continue
        m = _FIELD_NAME.match(line)
        if m is not None:
            headers.append([m.group(1), line[m.end() :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    for i, lines in more.items():
        headers[i][1] += b"".join(lines)
    return headers


def parse_tags(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's parse_tag_value (RFC 6376 3.2), without a regex per tag.

    Same result and same exceptions for every input: a tag name only has to start
    with an ASCII letter (dkimpy's `^[a-zA-Z](\\w)*` is not anchored at the end),
    and names and values are stripped of ASCII whitespace at both ends."""
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:
        specs.pop()  # a trailing semicolon is allowed
    for spec in specs:
        key, eq, value = spec.partition(b"=")
        if not eq:
            raise InvalidTagSpec(spec)
        key = key.strip()
        if not key[:1].isalpha():  # bytes.isalpha(): ASCII letters only
            raise InvalidTagSpec(spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = value.strip()
    return tags


_H_SEP = re.compile(rb"\s*:\s*")
# dkimpy's validation patterns, compiled once (it passes them to re.match per call).
_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_DECIMAL = re.compile(rb"[0-9]+$")
# RFC 6376 3.5: t= and x= have at most 12 digits, l= at most 76. Longer numbers are
# never read (wire.number): int() of 5,000 digits raises, after quadratic work.
_MAX_TIME_DIGITS = 12
_FAR_FUTURE = 10**_MAX_TIME_DIGITS  # beyond any 12-digit time: what a longer one means
_MAX_LENGTH_DIGITS = 76
_LENGTH = re.compile(rb"[0-9]{,76}$")  # as dkimpy: an empty l= passes here, and fails later


def _timestamp(digits: bytes) -> int:
    """A t= or x= value already checked to be ASCII digits."""
    value = number(digits.strip().lstrip(b"0") or b"0", _MAX_TIME_DIGITS)
    return _FAR_FUTURE if value is None else value


_SPACE = b" \t\n\r\x0b\x0c"  # what \s matches in a bytes pattern
_B64 = _SPACE + b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/"


def base64ish(value: bytes) -> bool:
    r"""dkimpy's test of b= and bh=, `re.match(rb"[\s0-9A-Za-z+/]+[\s=]*$", value)`, in
    linear time: its pattern backtracks quadratically on a run of white space that
    ends in a character it refuses (60 KB of folding held the loop for 15 s).

    The value is base64 characters and white space, then white space and "=": what
    is left once the trailing white space and "=" are cut must be all of the first
    kind, and if nothing is left, the value must begin with white space."""
    head = value.rstrip(_SPACE + b"=")
    if not head:
        return value[:1] != b"" and value[:1] in _SPACE
    return not head.translate(None, _B64)


_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_CLOCK_SLOP = 36000  # dkimpy's 10 hours of leeway for t= and x=


def auid(sig: dict[bytes, bytes]) -> bytes:
    """The signature's i= decoded from dkim-quoted-printable (RFC 6376 2.11): "=XX"
    is one octet, and folding whitespace is not part of the value. A "=" without two
    hex digits after it is a ValidationError, as any malformed tag value."""
    raw = sig[b"i"].translate(None, _SPACE)
    if b"=" not in raw:
        return raw
    head, *rest = raw.split(b"=")
    out = [head]
    for piece in rest:
        code = piece[:2]
        if len(code) != 2 or not all(c in _HEX for c in code):
            raise dkim.ValidationError(f"i= value is not dkim-quoted-printable ({sig[b'i']!r})")
        out += (bytes((int(code, 16),)), piece[2:])
    return b"".join(out)


_HEX = frozenset(b"0123456789ABCDEFabcdef")


def validate_signature_fields(sig: dict[bytes, bytes]) -> None:
    """dkimpy's validate_signature_fields for a DKIM-Signature: the same checks in
    the same order, raising the same ValidationError with the same text.

    Three differences, on purpose:
    - an i= that is d= itself (no room for the "@" or "." before the domain) is a
      ValidationError here. dkimpy's index runs off the front of the value there and
      raises IndexError, which no caller expects: the whole check failed, and DMARC
      then lost the message's good signatures too;
    - i= is dkim-quoted-printable (RFC 6376 3.5): "u=40sub.example" is compared
      decoded, where dkimpy refuses it as not under d=;
    - q= is a list of query methods, of which unknown ones "MUST be ignored" (3.5):
      one that names dns/txt among others is accepted, where dkimpy wants it alone.
    """
    for field in _MANDATORY:
        if field not in sig:
            raise dkim.ValidationError(f"missing {field!r}=")
    if sig[b"a"] not in dkim.HASH_ALGORITHMS:
        raise dkim.ValidationError(f"unknown signature algorithm: {sig[b'a']!r}")
    b, bh, d = sig[b"b"], sig[b"bh"], sig[b"d"]
    # dkimpy matches b= against the pattern a second time where it means bh=;
    # that repeat can only agree with the first, so it is not made here.
    if not base64ish(b) or len(b.translate(None, _SPACE)) % 4:
        raise dkim.ValidationError(f"b= value is not valid base64 ({b!r})")
    if len(bh.translate(None, _SPACE)) % 4:
        raise dkim.ValidationError(f"bh= value is not valid base64 ({bh!r})")
    if b"cv" in sig and sig[b"cv"] not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        raise dkim.ValidationError(f"cv= value is not valid ({sig[b'cv']!r})")
    if d.isascii() and _D_SPECIALS.search(d):  # dkimpy checks ASCII domains only
        raise dkim.ValidationError(f"d= value is not valid ({d!r})")
    if b"i" in sig:
        i = auid(sig)
        if (
            not i.lower().endswith(d.lower())
            or len(i) <= len(d)
            or i[-len(d) - 1] not in (0x40, 0x2E)  # "@" or "."
        ):
            raise dkim.ValidationError(f"i= domain is not a subdomain of d= (i={i!r} d={d!r})")
    if b"l" in sig and _LENGTH.match(sig[b"l"]) is None:
        raise dkim.ValidationError(f"l= value is not a decimal integer ({sig[b'l']!r})")
    if b"q" in sig and b"dns/txt" not in sig[b"q"].translate(None, _SPACE).lower().split(b":"):
        raise dkim.ValidationError(f"q= value is not dns/txt ({sig[b'q']!r})")
    now = int(time.time())
    t_sign = None
    if b"t" in sig:
        if _DECIMAL.match(sig[b"t"]) is None:
            raise dkim.ValidationError(f"t= value is not a decimal integer ({sig[b't']!r})")
        t_sign = _timestamp(sig[b"t"])
        if t_sign > now + _CLOCK_SLOP:
            raise dkim.ValidationError(f"t= value is in the future ({sig[b't']!r})")
    if sig[b"v"] != b"1":
        raise dkim.ValidationError(f"v= value is not 1 ({sig[b'v']!r})")
    if b"x" in sig:
        if _DECIMAL.match(sig[b"x"]) is None:
            raise dkim.ValidationError(f"x= value is not a decimal integer ({sig[b'x']!r})")
        x_sign = _timestamp(sig[b"x"])
        if x_sign < now - _CLOCK_SLOP:
            raise dkim.ValidationError(f"x= value is past ({sig[b'x']!r})")
        if t_sign and x_sign < t_sign:
            raise dkim.ValidationError(
                f"x= value is less than t= value (x={sig[b'x']!r} t={sig[b't']!r})"
            )


def key_name(sig: dict[bytes, bytes]) -> str:
    """Where a signature's key is published (RFC 6376 3.6.2.1): s._domainkey.d. For
    DKIM-Signature and ARC's two signatures alike, once their tags are validated."""
    return (sig[b"s"] + b"._domainkey." + sig[b"d"]).decode("ascii", "replace").lower()


def signed_names(sig: dict[bytes, bytes]) -> list[bytes]:
    """The header field names in a signature's h=, lower-case, in order."""
    return [x.lower() for x in _H_SEP.split(sig[b"h"])]


def headerprep(d: Any, idx: int) -> Any:
    """dkimpy's DKIM.verify_headerprep(idx), with our tag parser and without its
    debug line, which formats the whole signature even when nothing logs it:
    (tags, lower-case h= names, the DKIM-Signature fields), or False past the last."""
    sigheaders = [(x, y) for x, y in d.headers if x.lower() == b"dkim-signature"]
    if len(sigheaders) <= idx:
        return False
    try:
        sig = parse_tags(sigheaders[idx][1])
    except InvalidTagValueList as e:
        raise dkim.MessageFormatError(e) from None
    d.signature_fields = sig
    validate_signature_fields(sig)
    d.domain, d.selector = sig[b"d"], sig[b"s"]
    include_headers = signed_names(sig)
    if b"from" not in include_headers:
        # RFC 6376 6.1.1: the verifier MUST ignore such a signature (PERMFAIL). dkimpy
        # only refuses to sign without From; verifying, it would pass one, and a pass
        # that does not cover From could vouch for any From of the signing domain.
        raise dkim.ValidationError("From field not signed")
    d.include_headers = tuple(include_headers)
    return sig, include_headers, sigheaders


# dkimpy's patterns, compiled once (dkimpy passes strings to re.sub on every call).
_WSP_RUN = re.compile(rb"[\t ]+")
_EOL = re.compile(rb"\r?\n")
# dkimpy's RE_BTAG, `([;\s]b FWS =)(?:FWS [base64 char])*(?:\r?\n\Z)?`, rewritten
# without the nested optional groups that make it slow (40 µs per signature):
# FWS matches exactly the runs of \s, and (\s* c)* is c* (\s+ c+)*. Same matches;
# a property test holds the two against each other.
_BTAG = re.compile(rb"([;\s]b\s*=)[a-zA-Z0-9+/=]*(?:\s+[a-zA-Z0-9+/=]+)*(?:\r?\n\Z)?")


def relaxed_field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """RFC 6376 3.4.2, exactly as dkimpy's Relaxed.canonicalize_headers does it."""
    unfolded = value.replace(b"\r\n", b"")
    if (
        b"\n" not in unfolded
        and b"\r" not in unfolded
        and b"\t" not in unfolded
        and b"  " not in unfolded
    ):
        # Folded only with CRLF, single spaces (nearly every field, the signature's
        # own included): the two regex passes would only remove the CRLFs.
        return name.lower().rstrip(), unfolded.strip() + b"\r\n"
    return name.lower().rstrip(), _WSP_RUN.sub(b" ", _EOL.sub(b"", value)).strip() + b"\r\n"


_SPACE_RUNS = (b" " * 16, b" " * 4, b" " * 2)


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4, exactly as dkimpy's Relaxed.canonicalize_body does it, without
    its two regex passes (20-65 ns a byte: 2 ms for a 100 KB body, and relaxed/relaxed
    is what most large senders sign with). Every run of WSP becomes one space, so
    tabs can become spaces first, and runs of spaces can shrink by any replace of
    several spaces with one, long ones first; after that, the WSP ending a line is
    at most one space. Each step is a C-speed pass over the bytes: 1.6-2 ns a byte
    on text and base64, at most about 11 on whitespace built to be dear."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b"  " in body:
        for run in _SPACE_RUNS:
            while run in body:
                body = body.replace(run, b" ")
    canonical: bytes = correct_empty_body(strip_trailing_lines(body.replace(b" \r\n", b"\r\n")))
    return canonical


def strip_b(value: bytes) -> bytes:
    """The signature header's value with the b= tag's value removed (RFC 6376 3.7)."""
    return _BTAG.sub(rb"\1", value)


def select_headers(headers: list[Any], include: list[bytes]) -> list[Any]:
    """dkimpy's select_headers (RFC 6376 5.4.2: each name in h= takes the last
    field of that name not taken yet, bottom up), in time linear in the fields and
    the names: each name's fields are listed once, and each use takes the last one
    left. (Searching the fields for each name, as dkimpy does, is names x fields: a
    signature of 4,000 names over 40,000 fields held the event loop for 30 s.)"""
    positions: dict[bytes, list[int]] = {}
    for i, h in enumerate(headers):
        positions.setdefault(h[0].lower(), []).append(i)
    selected = []
    for name in include:
        left = positions.get(name)
        if left:
            selected.append(headers[left.pop()])
    return selected


def hash_headers(
    h: Any,
    relaxed: bool,
    headers: list[Any],
    include: list[bytes],
    sigheader: tuple[bytes, bytes],
) -> None:
    """dkimpy's hash_headers, canonicalising only the selected fields: the others
    cannot change the hash, and canonicalising them all cost as much again."""
    selected = select_headers(headers, include)
    sig_name, sig_value = sigheader[0], strip_b(sigheader[1])
    if relaxed:
        selected = [relaxed_field(n, v) for n, v in selected]
        sig_name, sig_value = relaxed_field(sig_name, sig_value)
    for name, value in selected:
        h.update(name)
        h.update(b":")
        h.update(value)
    h.update(sig_name)  # hashed without its trailing CRLF (RFC 6376 3.7)
    h.update(b":")
    h.update(sig_value.rstrip())


def verify(d: Any, idx: int, prep: Any, key: PublicKey) -> bool:
    """Verify signature `idx` of dkim.DKIM `d` with `key`: dkimpy's verify_sig_process,
    RSA by OpenSSL. Raises the dkimpy exception dkimpy would for the same input.

    `prep` is what `headerprep(d, idx)` returned (parsed once by the caller).
    """
    sig, include_headers, sigheaders = prep
    return verify_sig(d, sig, include_headers, sigheaders[idx], key)


def verify_sig(
    d: Any, sig: dict[bytes, bytes], include_headers: list[bytes], sigheader: Any, key: PublicKey
) -> bool:
    """dkimpy's verify_sig_process for any signature field (DKIM-Signature, and ARC's
    two): the body hash when the field has bh=, then the header hash, verified by
    OpenSSL (RSA; ed25519 over the SHA-256 of the header hash input, RFC 8463)."""
    if key.tlsrpt:
        raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
    try:
        canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as e:
        raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
    algorithm = sig[b"a"]
    public = key.public
    if isinstance(public, ed25519.Ed25519PublicKey):
        if algorithm != b"ed25519-sha256":
            raise dkim.ValidationError(f"algorithm {algorithm!r} does not match an ed25519 key")
    elif algorithm not in _PREHASHED:
        raise dkim.ValidationError(f"algorithm {algorithm!r} does not match an RSA key")
    hasher = dkim.HASH_ALGORITHMS[algorithm]

    if b"bh" in sig:
        if canon.body_algorithm is Relaxed:
            body = relaxed_body(d.body)
        else:
            body = canon.canonicalize_body(d.body)
        if b"l" in sig:
            body = body[: number(sig[b"l"].strip(), _MAX_LENGTH_DIGITS) or 0]
        if hasher(body).digest() != base64.b64decode(sig[b"bh"].translate(None, _SPACE)):
            raise dkim.ValidationError(f"body hash mismatch (expected {sig[b'bh']!r})")

    if b"from" in include_headers:  # dkimpy's bug#644046 guard: extra From fields count
        include_headers = [*include_headers, b"from"]
    h = hasher()
    hash_headers(
        h, canon.header_algorithm.name == b"relaxed", d.headers, include_headers, sigheader
    )
    signature = base64.b64decode(sig[b"b"].translate(None, _SPACE))
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, h.digest())
            return True
        public.verify(signature, h.digest(), padding.PKCS1v15(), _PREHASHED[algorithm])
    except InvalidSignature:
        return False
    if key.bits < MIN_BITS:
        raise dkim.KeyFormatError(f"public key too small: {key.bits}")
    return True
