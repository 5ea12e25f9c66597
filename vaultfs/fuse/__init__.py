"""vaultfs.fuse."""
