"""Thin transport adapters: they feed bytes to the codec and requests to the service."""
