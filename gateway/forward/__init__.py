"""Delivery to the backend: our SMTP client, its pool, failover, and the maildir sink."""
