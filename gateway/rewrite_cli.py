"""`smtp-gateway rewrite ADDRESS --sender|--recipient`: each stage's result, in order,
from the tables the configured policy loads (for operators to test their tables)."""

from __future__ import annotations

from gateway import config
from gateway.address import AddressError, parse_path
from gateway.checks.registry import all_known_symbols
from gateway.checks.relay import RelayCheck
from gateway.pipeline import policy as policy_mod
from gateway.rewrite.engine import AliasLoop, Rewriter, SrsError


def _show(stage: str, before: str, after: str) -> None:
    print(f"  {stage:<20} {after if after != before else '(unchanged)'}")


def recipient(rw: Rewriter, relay: RelayCheck, text: str) -> int:
    addr = parse_path(text)
    print(f"recipient {addr.path}")
    canon = rw.canonical_recipient(addr)
    _show("canonical_recipient", str(addr), str(canon))
    local = relay.is_local(canon)
    print(f"  {'relay control':<20} {'local: accepted' if local else 'not local: 550 5.7.1'}")
    if not local:
        return 1
    try:
        rev = rw.srs_reverse(canon)
    except SrsError as e:
        print(f"  {'srs_reverse':<20} refused: {e} (550 5.1.1)")
        return 1
    _show("srs_reverse", str(canon), str(rev))
    try:
        out = rw.expand(rev)
    except AliasLoop as e:
        print(f"  {'virtual_alias':<20} refused: {e} (550 5.4.6)")
        return 1
    final = ", ".join(str(a) for a in out)
    _show("virtual_alias", str(rev), final)
    leaves = [a for a in out if not relay.is_local(a)]
    if leaves and rw.srs is not None:
        print(
            f"  {'(forwarding)':<20} {', '.join(map(str, leaves))} leave our domains: SRS applies"
        )
    print(f"  => {final}")
    return 0


def sender(rw: Rewriter, text: str) -> int:
    addr = parse_path(text, allow_null=True)
    print(f"sender {addr.path}")
    cur = addr
    for step in rw.sender_steps(addr):
        _show(step.stage, str(cur), str(step.result[0]))
        cur = step.result[0]
    if rw.srs is not None:
        _show("srs_forward", str(cur), str(rw.srs_forward(cur)))
        print("  (SRS only when a recipient is forwarded off our domains)")
    print(f"  => {cur.path}")
    return 0


def run(address: str, is_sender: bool, config_path: str | None) -> int:
    settings = config.load(config_path)
    pol = policy_mod.load(settings.policy, all_known_symbols())
    text = address if address.startswith("<") else f"<{address}>"
    try:
        if is_sender:
            return sender(pol.rewriter, text)
        return recipient(pol.rewriter, RelayCheck(settings.local_domains), text)
    except AddressError as e:
        print(f"{address}: not a valid address: {e}")
        return 1
