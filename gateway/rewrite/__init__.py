"""Address rewriting: canonical, virtual alias, masquerading, SRS."""
