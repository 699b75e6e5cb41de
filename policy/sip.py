"""Just enough SIP URI parsing to split `user` and `domain` out of From/To/R-URI."""

from __future__ import annotations


def split_uri(uri: str) -> tuple[str, str]:
    """Return (user, host) of a SIP/SIPS/TEL URI or name-addr; empty strings when absent.

    >>> split_uri('"Alice" <sip:6001@example.com:5060;transport=udp>;tag=1')
    ('6001', 'example.com')
    """
    if uri.startswith("sip:") and "<" not in uri:
        # the common form "sip:user@host" with nothing else: no copies beyond the split
        user, at, host = uri[4:].partition("@")
        if at and ";" not in host and ":" not in host and ":" not in user and ";" not in user and "?" not in host:
            return user, host.lower()
    s = uri.strip()
    if "<" in s:
        start = s.index("<") + 1
        end = s.find(">", start)
        s = s[start:] if end < 0 else s[start:end]
    low = s[:5].lower()
    if low.startswith("sips:"):
        s = s[5:]
    elif low.startswith("sip:") or low.startswith("tel:"):
        s = s[4:]
    for sep in ";?":
        cut = s.find(sep)
        if cut >= 0 and "@" not in s[cut:]:
            s = s[:cut]
    if low.startswith("tel:"):
        return s, ""
    if "@" in s:
        user, host = s.rsplit("@", 1)
        user = user.split(":", 1)[0]  # drop a password
    else:
        user, host = "", s
    if host.startswith("["):
        host = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return user, host.lower()
