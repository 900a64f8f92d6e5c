"""Reputation: blocklist, unsubscribe, bounce and complaint processing, suspension."""
