"""Sender Rewriting Scheme (Shevek's SRS0/SRS1, as libsrs2 and postsrsd write it).

Forwarding to another domain with the original envelope sender makes the next
hop's SPF check fail (we are not the sender's server). SRS puts our domain in
the sender, with the original inside and an HMAC so nobody can use us as a
bounce relay:

    SRS0=HHHH=TT=orig.example=user@srs.example.org
    SRS1=HHHH=hop1.example==HHHH=TT=orig.example=user@srs.example.org

TT is the day (mod 1024, base32) so old addresses expire; HHHH is HMAC-SHA1
over the rest, in base32 (MTAs may fold the case of local parts, and base32 has
no case to lose), `hash_length` characters of 5 bits. libsrs2 and postsrsd
write 4 characters of base64 compared without case: about 2 million values,
which one client found by guessing in minutes. Twelve of base32 are 60 bits: at
10,000 guesses a second, more than the gateway answers, the 21 days an address
lives give 1.8e10 guesses, one chance in 60 million to hit a valid hash.
The first secret signs; every secret in the list verifies, so a key can be
rotated without refusing bounces to addresses made with the previous one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_DAY = 86400
_MOD = 1024  # TT wraps after 1024 days


class SrsError(ValueError):
    """A bounce address we did not make, or made too long ago."""


class Srs:
    def __init__(
        self,
        domain: str,
        secrets: Sequence[str],
        *,
        max_age_days: int = 21,
        hash_length: int = 12,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("SRS needs at least one secret")
        self.domain = domain.lower()
        self.keys = [s.encode() for s in secrets]
        self.max_age = max_age_days
        self.hash_length = hash_length
        self.clock = clock

    def _today(self) -> int:
        return int(self.clock() // _DAY) % _MOD

    def _hash(self, key: bytes, *parts: str) -> str:
        # The parts separated: run together, "bank.co" + "mceo" and "bank.com" + "ceo"
        # hash alike, and one issued address would forge another one.
        mac = hmac.new(key, "\x00".join(parts).lower().encode(), hashlib.sha1).digest()
        return base64.b32encode(mac).decode()[: self.hash_length]

    def _verify(self, given: str, *parts: str) -> bool:
        if len(given) != self.hash_length:
            return False
        given = given.upper()
        return any(hmac.compare_digest(self._hash(k, *parts), given) for k in self.keys)

    @staticmethod
    def is_srs(local: str) -> bool:
        head = local[:5].upper()
        return head in ("SRS0=", "SRS0+", "SRS0-", "SRS1=", "SRS1+", "SRS1-")

    def forward(self, local: str, domain: str) -> str:
        """The local part to use at our SRS domain for sender local@domain."""
        if domain.lower() == self.domain:
            return local  # already ours
        if local[:5].upper() in ("SRS1=", "SRS1+", "SRS1-"):
            # SRS1=H=hop1==rest@domain: keep the first hop, re-sign for us.
            body = local[5:]
            parts = body.split("=", 2)
            if len(parts) == 3 and parts[2].startswith("="):
                hop, rest = parts[1], parts[2]
                return f"SRS1={self._hash(self.keys[0], hop, rest)}={hop}={rest}"
        if local[:5].upper() in ("SRS0=", "SRS0+", "SRS0-"):
            rest = "=" + local[5:]
            return f"SRS1={self._hash(self.keys[0], domain, rest)}={domain}={rest}"
        tt = _B32[(self._today() >> 5) & 31] + _B32[self._today() & 31]
        return f"SRS0={self._hash(self.keys[0], tt, domain, local)}={tt}={domain}={local}"

    def reverse(self, local: str) -> tuple[str, str]:
        """The (local, domain) an SRS local part at our domain stands for. Raises
        SrsError for a bad hash, a bad format or an expired timestamp."""
        kind = local[:4].upper()
        body = local[5:]
        if kind == "SRS1":
            parts = body.split("=", 2)
            if len(parts) != 3 or not parts[2].startswith("="):
                raise SrsError("malformed SRS1 address")
            given, hop, rest = parts
            if not self._verify(given, hop, rest):
                raise SrsError("SRS1 hash does not verify")
            return "SRS0" + rest, hop
        if kind != "SRS0":
            raise SrsError("not an SRS address")
        parts = body.split("=", 3)
        if len(parts) != 4:
            raise SrsError("malformed SRS0 address")
        given, tt, domain, user = parts
        if len(tt) != 2 or any(c not in _B32 for c in tt.upper()):
            raise SrsError("malformed SRS0 timestamp")
        if not self._verify(given, tt.upper(), domain, user) and not self._verify(
            given, tt, domain, user
        ):
            raise SrsError("SRS0 hash does not verify")
        stamp = _B32.index(tt[0].upper()) << 5 | _B32.index(tt[1].upper())
        age = (self._today() - stamp) % _MOD
        if age > self.max_age:
            raise SrsError(f"SRS0 address expired ({age} days old)")
        if not domain or not user:
            raise SrsError("malformed SRS0 address")
        return user, domain
