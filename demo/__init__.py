"""Embedded, disposable engines for `make demo` and the tests: nothing to install, no Docker."""
