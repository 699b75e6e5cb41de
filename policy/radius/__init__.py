"""The RADIUS front end's pure parts and the shipped dictionary (see docs/radius.md).

`packet` is the codec (bytes <-> packets, authenticators), `clients` the client table,
`adapter` turns packets into the service's operations and their replies into packets. The
sockets are `policy.transports.radius`.
"""

from __future__ import annotations

from pathlib import Path

DICTIONARY = Path(__file__).resolve().with_name("dictionary")
