"""Runs the loaded policy's checks at each SMTP stage and turns symbols into a verdict."""
