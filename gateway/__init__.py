"""smtp-gateway: an inbound SMTP security gateway in front of a real MTA."""

__version__ = "0.1.0"
