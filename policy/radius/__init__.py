"""RADIUS support files: the shipped dictionary (see docs/radius.md).

The listener itself is `policy.transports.radius`.
"""

from __future__ import annotations

from pathlib import Path

DICTIONARY = Path(__file__).resolve().with_name("dictionary")
