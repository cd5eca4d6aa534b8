"""Standalone CDC consumer: event_outbox inserts from the WAL (pgoutput) into ClickHouse.

Must not import Django: it runs as its own process, next to but independent of the web app.
"""
