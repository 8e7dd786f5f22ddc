"""Fast single-process tests without services (`make test-fast`)."""
