"""The `streamedit` command: one entry point for serve, build-engine and loadtest."""
