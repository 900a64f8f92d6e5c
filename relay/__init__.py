"""relay: a self-hosted email sending service."""

__version__ = "0.1.0"
