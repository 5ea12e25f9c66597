"""vaultfs.ops."""
