"""The `vault` command-line interface: one module per command."""
