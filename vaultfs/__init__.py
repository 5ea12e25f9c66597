"""vaultfs: encrypted, deduplicating backup vaults in the restic repository format."""

__version__ = "0.1.0"
