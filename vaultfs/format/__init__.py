"""vaultfs.format."""
