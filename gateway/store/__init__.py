"""Counters and leases for limits: in memory (one process) today; Redis to come."""
