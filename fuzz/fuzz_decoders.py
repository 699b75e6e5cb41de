"""Coverage-guided fuzzing (atheris, libFuzzer) of every decoder that reads bytes from a peer.

Each target states the decoder's promise, and any other exception is a crash libFuzzer reports
(with the input that caused it, saved as `crash-*`):

- `stream`:   `policy.wire.StreamDecoder` - any bytes, in any chunks, give messages or a
              ProtocolError (and then ProtocolError again), nothing else;
- `datagram`: `policy.wire.decode_datagram` - any datagram gives a Message or a BadMessage;
- `protocol`: `policy.protocol.decode` - any payload gives a typed request or a RequestError;
- `radius`:   `policy.radius.packet.parse` - any datagram gives a Packet or a RadiusError.

    .venv/bin/python fuzz/fuzz_decoders.py TARGET [libFuzzer flags, e.g. -runs=200000 -max_total_time=30]

`make fuzz` runs each target for a fixed time and prints executions per second.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from policy import protocol, wire
    from policy.errors import ProtocolError, RequestError
    from policy.radius import packet


def stream(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    dec = wire.StreamDecoder(max_message=fdp.ConsumeIntInRange(64, 4096))
    failed = False
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        try:
            for event in dec.feed(chunk):
                assert isinstance(event, wire.Message) and isinstance(event.payload, bytes)
            assert not failed, "events after a ProtocolError"
        except ProtocolError:
            failed = True


def datagram(data: bytes) -> None:
    event = wire.decode_datagram(data, max_message=1024)
    assert isinstance(event, wire.Message | wire.BadMessage)


def decode(data: bytes) -> None:
    try:
        req = protocol.decode(data)
    except RequestError:
        return
    assert isinstance(req, protocol.Request)


def radius(data: bytes) -> None:
    try:
        p = packet.parse(data)
    except packet.RadiusError:
        return
    assert 20 <= len(p.data) <= packet.MAX_PACKET and len(p.authenticator) == 16


TARGETS: dict[str, Callable[[bytes], None]] = {"stream": stream, "datagram": datagram, "protocol": decode,
                                               "radius": radius}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: fuzz_decoders.py {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
