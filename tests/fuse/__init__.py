"""Tests of vaultfs.fuse: the snapshot layout as data, and real FUSE mounts driven through `vault mount`."""
