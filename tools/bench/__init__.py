"""The platform benchmark: python -m tools.bench (see __main__.py and docs/performance.md)."""
