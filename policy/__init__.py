"""callpolicy: a call-limiting policy engine for SIP proxies."""

__version__ = "0.1.0"
