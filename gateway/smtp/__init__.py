"""The client-facing SMTP front end: protocol plumbing only, no policy."""
