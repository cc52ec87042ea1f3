"""Fuzz target: the payload decoders of roomcast.wire.events: ``decode_ingest``
(Kafka message.ingest, read by the chat service), ``decode_event``,
``decode_event_seq`` and ``decode_optional_seq`` (message.created, history
and Redis ``room:<id>`` payloads; the fan-out reads the optional seq).

The input is the payload as bytes; the decoders that take str too also get
it as str when it is UTF-8, and as str with lone surrogates otherwise (what
a careless caller's ``decode(errors="surrogateescape")`` would pass).

Properties:

- each decoder returns its documented type or raises ``msgspec.DecodeError``
  (its documented error, ValidationError included), nothing else;
- a decoded record or event has the field types of its schema and survives
  encode-then-decode unchanged;
- ``decode_event_seq`` and ``decode_optional_seq`` agree with
  ``decode_event(...).seq`` whenever the full decode succeeds, and with each
  other whenever ``decode_event_seq`` succeeds; ``decode_optional_seq`` gives
  None only where ``decode_event_seq`` finds no seq.
"""

from __future__ import annotations

import msgspec

from roomcast.wire.events import (
    IngestRecord,
    MessageEvent,
    decode_event,
    decode_event_seq,
    decode_ingest,
    decode_optional_seq,
    encode_event,
    encode_ingest,
)


def check(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = data.decode(errors="surrogateescape")
    for payload in (data, text):
        record = _decoded(decode_ingest, payload)
        if record is not None:
            assert type(record) is IngestRecord
            _check_fields(record, int_fields=("received_at",))
            assert decode_ingest(encode_ingest(record)) == record
        event = _decoded(decode_event, payload)
        if event is not None:
            assert type(event) is MessageEvent
            _check_fields(event, int_fields=("seq", "ts"))
            assert decode_event(encode_event(event)) == event
    seq = _decoded(decode_event_seq, data)
    assert seq is None or type(seq) is int, seq
    optional_seq = _decoded(decode_optional_seq, data)
    assert optional_seq is None or type(optional_seq) is int, optional_seq
    if seq is not None:
        assert optional_seq == seq, (optional_seq, seq)
    event = _decoded(decode_event, data)
    if event is not None:
        assert seq == event.seq, (seq, event)


def _decoded(decoder, payload):  # type: ignore[no-untyped-def]
    try:
        return decoder(payload)
    except msgspec.DecodeError:
        return None


def _check_fields(value: msgspec.Struct, int_fields: tuple[str, ...]) -> None:
    for name in value.__struct_fields__:
        expected = int if name in int_fields else str
        assert type(getattr(value, name)) is expected, (name, value)
