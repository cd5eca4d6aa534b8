"""The Django project: settings, the outbox publish helper and the example `accounts` domain."""
