"""Typed exceptions; every message names the file, rule and key it is about."""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of every error callpolicy raises on purpose."""


class RuleError(PolicyError):
    """A rule file could not be loaded: names the file, the rule and the key."""

    def __init__(
        self, file: str, rule: str | None, key: str | None, message: str, kind: str = "rule"
    ) -> None:
        self.file = file
        self.rule = rule
        self.key = key
        self.message = message
        parts = [file]
        if rule is not None:
            parts.append(f"{kind} {rule!r}")
        if key is not None:
            parts.append(f"key {key!r}")
        super().__init__(": ".join([*parts, message]))


class SettingsError(PolicyError):
    """service.toml (or a command-line override) is invalid: names the file and key."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        where = f"{file}: key {key!r}" if key else file
        super().__init__(f"{where}: {message}")


class StoreError(PolicyError):
    """The counter store could not be read or written (down, slow, or refused)."""


class ProtocolError(PolicyError):
    """A byte stream cannot be decoded any further; the connection must be closed."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class RequestError(PolicyError):
    """A well-framed request is invalid (bad JSON, unknown op, missing field); answered, not fatal."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class SnapshotError(PolicyError):
    """A snapshot file of the embedded store is unreadable or corrupt."""
