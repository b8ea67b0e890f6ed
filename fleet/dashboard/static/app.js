// The dashboard: filled in by the next commit.
