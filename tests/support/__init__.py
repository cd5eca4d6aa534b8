"""Test support: fixtures and fakes at the edge of the process."""
