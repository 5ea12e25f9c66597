"""The vaultfs bucket server (trio)."""
