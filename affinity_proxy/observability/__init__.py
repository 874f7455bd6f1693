"""Metrics and logs: one CollectorRegistry per process, structured logging with redaction."""
