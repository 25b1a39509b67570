"""Protocol-free checks: a typed context in, outcome symbols out (never a reply)."""
