"""Tests of the bucket server (server/, installed as vaultfs.server)."""
