"""Shared test infrastructure: tricky trees (trees), the real restic (restic), FUSE checks (fuse), CI
semantics for missing tools (ci) and CLI environments (env). Fixtures built from these live in
tests/conftest.py.
"""
