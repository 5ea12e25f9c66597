"""Tests of the shared test infrastructure in tests/helpers and tests/conftest.py."""
