"""DMARC aggregate reports (RFC 7489 7.2, Appendix C): each DMARC evaluation
recorded at the end of its transaction, counted per interval in a store, and sent
once per interval to the domains that ask for reports.

record.py (the hot path: what one message adds), store.py and redisstore.py (where
the counts are kept), rua.py (where reports may go), feedback.py (the XML),
message.py (the mail that carries it), relay.py (handing it over), run.py (one
reporting run), schedule.py (when, and which process), service.py (the parts an
App runs), command.py (`smtp-gateway dmarc-report`).
"""
