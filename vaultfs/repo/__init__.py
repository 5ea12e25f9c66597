"""vaultfs.repo."""
