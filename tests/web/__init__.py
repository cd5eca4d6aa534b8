"""Tests of the Django side: settings, observability, the outbox publish helper, accounts."""
