"""Test support: loopback DNS server, SMTP sink, relay subprocess runner."""
