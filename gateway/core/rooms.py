"""The per-process room registry, per-room sequencing and fan-out planning.

A `Room` exists while at least one local socket is in it or joining it. The
registry reports the two facts the Redis adapter needs: "first local socket
in r1" (SUBSCRIBE) and "last one left r1" (UNSUBSCRIBE), as centrifuge's hub
reports a first subscriber to its broker.

Each room remembers the last seq this process delivered. An event whose seq
is not above it is a duplicate (a Kafka redelivery, a chat re-emit) and is
dropped once here, before fan-out, instead of once per socket.

A socket's membership goes through three states:

- joining: the join waits for its SUBSCRIBE confirmation and the room's
  latest seq (history). Live events are buffered for it, so nothing published
  after the SUBSCRIBE is missed.
- catching up: it was sent history up to a seq (its floor) that this process
  has not delivered yet (history runs ahead of the Redis path); it gets only
  events above its floor, then becomes live.
- live: it gets every accepted event, through the shared buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import msgspec

from gateway.core.server_frames import text_frame_header
from roomcast.wire.events import EventSeq, decode_optional_seq, room_channel
from roomcast.wire.frames import MESSAGE_ENVELOPE_HEAD, MESSAGE_ENVELOPE_TAIL

__all__ = ["Room", "RoomRegistry", "Delivery", "Writer", "frame_events", "RegistryStats"]

Writer = Callable[[bytes], object]
Member = Hashable

_ENVELOPE_OVERHEAD = len(MESSAGE_ENVELOPE_HEAD) + len(MESSAGE_ENVELOPE_TAIL)
_seq_decoder = msgspec.json.Decoder(EventSeq)
# Frame headers of every payload size up to 8 KiB (events are smaller), made once.
_HEADERS = [text_frame_header(n) for n in range(8192)]


def frame_events(payloads: list[bytes]) -> bytes:
    """The `message` frames of these event payloads, concatenated into one buffer.

    PROTOCOL.md 4: each frame's payload is the envelope head + the event bytes as
    published + the tail; nothing is decoded or re-encoded.
    """
    parts: list[bytes] = []
    append = parts.append
    for payload in payloads:
        size = len(payload) + _ENVELOPE_OVERHEAD
        append(_HEADERS[size] if size < 8192 else text_frame_header(size))
        append(MESSAGE_ENVELOPE_HEAD)
        append(payload)
        append(MESSAGE_ENVELOPE_TAIL)
    return b"".join(parts)


class Room:
    __slots__ = ("id", "channel", "members", "joining", "catching_up", "last_seq", "known", "filling", "held", "recheck", "authoritative", "_writers")

    def __init__(self, room_id: str) -> None:
        self.id = room_id
        self.channel = room_channel(room_id).encode()
        self.members: dict[Member, Writer] = {}
        self.joining: dict[Member, list[tuple[int, bytes]]] = {}
        self.catching_up: dict[Member, tuple[Writer, int]] = {}
        # Last seq this process delivered, once `known`: set by the first event,
        # or by the first join that read the room's position from history.
        # Until then any seq is taken as it comes and no gap can be seen.
        self.last_seq = 0
        self.known = False
        # While a gap is being filled from history, live events wait in `held`.
        self.filling = False
        self.held: list[tuple[int, bytes]] = []
        # A check against history was asked for before the position was known.
        self.recheck = False
        # Some completed join read its position from history.
        self.authoritative = False
        self._writers: tuple[Writer, ...] | None = None

    @property
    def writers(self) -> tuple[Writer, ...]:
        """The live members' writers, as a tuple kept until membership changes:
        the fan-out loop iterates it (a snapshot, so a writer that closes its
        socket mid-loop is safe) without copying per delivery."""
        writers = self._writers
        if writers is None:
            writers = self._writers = tuple(self.members.values())
        return writers

    def set_member(self, member: Member, writer: Writer) -> None:
        self.members[member] = writer
        self._writers = None

    def drop_member(self, member: Member) -> None:
        if self.members.pop(member, None) is not None:
            self._writers = None

    def __len__(self) -> int:
        return len(self.members) + len(self.joining) + len(self.catching_up)

    def has(self, member: Member) -> bool:
        return member in self.members or member in self.joining or member in self.catching_up


@dataclass(slots=True)
class Delivery:
    """What to write for one room's batch of events.

    Write `buffer` to every writer in `room.members` (one write per socket, the
    same bytes), then each (writer, bytes) of `extra` (catching-up sockets).
    """

    room: Room
    buffer: bytes
    count: int
    extra: list[tuple[Writer, bytes]] | None = None
    # False: `buffer` is for nobody; only `extra` is written (a joiner's pending events).
    members: bool = True


@dataclass(slots=True)
class RegistryStats:
    events_accepted: int = 0
    events_duplicate: int = 0
    events_malformed: int = 0
    events_unsequenced: int = 0  # a third party's events without seq, passed through (PROTOCOL.md 6.7)
    gaps: int = 0  # gaps seen in the live stream
    gaps_filled: int = 0  # fills that closed every gap they were asked for
    gaps_unfilled: int = 0  # fills that left a gap (history could not supply it)


class RoomRegistry:
    """All rooms with a local socket in this process, by id and by Redis channel.

    With `fill_gaps` (a history API is configured), an event whose seq skips
    ahead of the last one delivered starts a fill: the room's later events are
    held, the room is put in `fill_requests` for the adapter to fetch the
    missing seqs from history (once per room and gap, not once per socket),
    and `finish_fill` delivers history and held events merged in seq order.
    Other rooms are never held up by it.
    """

    def __init__(self, fill_gaps: bool = False) -> None:
        self.rooms: dict[str, Room] = {}
        self.by_channel: dict[bytes, Room] = {}
        self.stats = RegistryStats()
        self.fill_gaps = fill_gaps
        # The registry's one output style: what the adapter must do, queued in
        # order and drained by it after each call (deliveries to write, rooms
        # whose gap to fill from history). Calls return only facts about
        # themselves (a room, whether it was the first or last member).
        self.outbox: list[Delivery] = []
        self.fill_requests: list[Room] = []

    # ---- membership ------------------------------------------------------

    def begin_join(self, room_id: str, member: Member) -> tuple[Room, bool]:
        """Start a join. Returns (room, first): first means SUBSCRIBE the room's channel.

        A member already in the room stays as it is (a repeated join).
        """
        room = self.rooms.get(room_id)
        first = room is None
        if room is None:
            room = self.rooms[room_id] = Room(room_id)
            self.by_channel[room.channel] = room
        if not room.has(member):
            room.joining[member] = []
        return room, first

    def complete_join(
        self, room: Room, member: Member, writer: Writer, sent_up_to: int, authoritative: bool = False
    ) -> None:
        """Finish a join after `joined` and any replay (up to seq `sent_up_to`) were sent.

        `authoritative`: sent_up_to is the room's position read from history
        (not a guess), so it may become this process's position. Queues the
        buffered live events the member still needs (a Delivery to `writer`
        alone), which the caller writes right away, before yielding to the
        loop. Nothing if the member left meanwhile.
        """
        buffered = room.joining.pop(member, None)
        if buffered is None:
            return
        pending = [payload for seq, payload in buffered if seq > sent_up_to]
        if pending:
            sent_up_to = max(sent_up_to, buffered[-1][0])
            self.outbox.append(Delivery(room, b"", len(pending), [(writer, frame_events(pending))], members=False))
        if sent_up_to > room.last_seq:
            room.catching_up[member] = (writer, sent_up_to)
        else:
            room.set_member(member, writer)
        room.authoritative = room.authoritative or authoritative
        if not room.known and not room.joining:
            self._joins_settled(room)

    def _joins_settled(self, room: Room) -> None:
        """The last join in flight of a room with no position ended (completed or left)."""
        if not (room.members or room.catching_up):
            return
        if room.authoritative:
            # The process has delivered nothing yet: it stands at the lowest
            # position any member has (events above it are still needed by
            # someone), so a gap after the joins is seen and filled like any other.
            self._settle_position(room)
        if room.held and not room.filling:
            # Events that came while only joins were in flight, now that there
            # is a position to check them against.
            held, room.held = room.held, []
            self.deliver(room, [payload for _, payload in held])

    def _settle_position(self, room: Room) -> None:
        floors = [floor for _, floor in room.catching_up.values()]
        if room.members:
            floors.append(room.last_seq)
        room.last_seq = min(floors)
        room.known = True
        for member, (writer, floor) in list(room.catching_up.items()):
            if floor <= room.last_seq:
                del room.catching_up[member]
                room.set_member(member, writer)
        if room.recheck and not room.filling:
            # A reconnect happened while the joins were reading history: what
            # was published before it may be missing, so check now.
            room.recheck = False
            room.filling = True
            self.fill_requests.append(room)

    def leave(self, room_id: str, member: Member) -> bool:
        """Remove member from room. True when it was the last local one: UNSUBSCRIBE."""
        room = self.rooms.get(room_id)
        if room is None:
            return False
        room.drop_member(member)
        was_joining = room.joining.pop(member, None) is not None
        room.catching_up.pop(member, None)
        if len(room) == 0:
            del self.rooms[room_id]
            del self.by_channel[room.channel]
            return True
        if was_joining and not room.known and not room.joining:
            self._joins_settled(room)
        return False

    def set_writer(self, room_id: str, member: Member, writer: Writer) -> None:
        """Swap a live member's writer (e.g. to a checked one while its socket is paused)."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        if member in room.members:
            room.set_member(member, writer)
        elif member in room.catching_up:
            room.catching_up[member] = (writer, room.catching_up[member][1])

    # ---- events ------------------------------------------------------------

    def deliver(self, room: Room, payloads: list[bytes]) -> None:
        """Plan the delivery of a room's events from one Redis read, in order, into the outbox.

        Drops malformed events and those whose seq is not above the last one
        delivered; frames the rest once. With fill_gaps, stops at a gap and
        holds the rest (see the class doc). Nothing is queued when nothing is
        left to write.
        """
        delivery = self._deliver(room, payloads)
        if delivery is not None:
            self.outbox.append(delivery)

    def _deliver(self, room: Room, payloads: list[bytes]) -> Delivery | None:
        if room.known and not (room.filling or room.joining or room.catching_up):
            # The steady state: every seq is the next one. One pass frames
            # them; anything else (a gap, a duplicate, junk) takes the general
            # path below, which starts again from the unchanged room.
            last = room.last_seq
            parts: list[bytes] = []
            append = parts.append
            for payload in payloads:
                try:
                    seq = _seq_decoder.decode(payload).seq
                except (msgspec.DecodeError, ValueError, RecursionError):
                    # RecursionError: absurd nesting, even in a skipped field.
                    # The general path counts it as malformed.
                    break
                if seq != last + 1:
                    break
                last = seq
                size = len(payload) + _ENVELOPE_OVERHEAD
                append(_HEADERS[size] if size < 8192 else text_frame_header(size))
                append(MESSAGE_ENVELOPE_HEAD)
                append(payload)
                append(MESSAGE_ENVELOPE_TAIL)
            else:
                if not parts:
                    return None
                count = last - room.last_seq
                room.last_seq = last
                self.stats.events_accepted += count
                return Delivery(room, b"".join(parts), count)
        return self._deliver_general(room, payloads)

    def _deliver_general(self, room: Room, payloads: list[bytes]) -> Delivery | None:
        last = room.last_seq
        known = room.known
        accepted: list[bytes] = []
        seqs: list[int] = []
        stats = self.stats
        # With joins in flight and no position yet, nothing is delivered: the
        # events wait until the joins say where the room stands (unless the
        # room has live members and no history to settle it: then it goes on).
        holding = room.filling or (
            not known and bool(room.joining) and (room.authoritative or not (room.members or room.catching_up))
        )
        unsequenced: list[bytes] = []
        for payload in payloads:
            try:
                seq = decode_optional_seq(payload)
            except (msgspec.DecodeError, ValueError):
                stats.events_malformed += 1
                continue
            if seq is None:
                # Not part of the room's sequence: never held, never a gap,
                # never a fill; straight to the live members.
                unsequenced.append(payload)
                continue
            if holding:
                room.held.append((seq, payload))
                continue
            if known:
                if seq <= last:
                    stats.events_duplicate += 1
                    continue
                if seq != last + 1:
                    stats.gaps += 1
                    if self.fill_gaps:
                        holding = room.filling = True
                        room.held.append((seq, payload))
                        self.fill_requests.append(room)
                        continue
            known = True
            last = seq
            accepted.append(payload)
            seqs.append(seq)
        if unsequenced and room.members:
            # Its own Delivery, queued ahead of the sequenced one: catching-up
            # members get only what fills their sequence.
            stats.events_unsequenced += len(unsequenced)
            self.outbox.append(Delivery(room, frame_events(unsequenced), len(unsequenced)))
        if not accepted:
            return None
        return self._accept(room, seqs, accepted)

    def begin_fill(self, room: Room) -> int | None:
        """Hold the room's live events for a fill after its last seq (e.g. after a
        Redis reconnect, when anything may have been missed). Returns that seq, or
        None if a fill is already running or nothing was delivered yet."""
        if room.filling:
            return None
        if not room.known:
            room.recheck = bool(room.joining)  # check once the joins in flight settle the position
            return None
        room.filling = True
        return room.last_seq

    def finish_fill(self, room: Room, history: list[tuple[int, bytes]]) -> None:
        """Queue history events and the held live ones merged by seq; resume live delivery.

        Whatever seqs are still missing stay missing (counted in gaps_unfilled):
        delivery goes on rather than stalling the room for good.
        """
        held, room.held = room.held, []
        room.filling = False
        merged: dict[int, bytes] = {}
        for seq, payload in history:
            merged.setdefault(seq, payload)
        for seq, payload in held:
            merged.setdefault(seq, payload)
        last = room.last_seq
        seqs = sorted(s for s in merged if s > last)
        self.stats.events_duplicate += len(held) + len(history) - len(seqs)
        if not seqs:
            self.stats.gaps_filled += 1
            return
        if seqs[-1] - last == len(seqs):
            self.stats.gaps_filled += 1
        else:
            self.stats.gaps_unfilled += 1
        self.outbox.append(self._accept(room, seqs, [merged[s] for s in seqs]))

    def _accept(self, room: Room, seqs: list[int], accepted: list[bytes]) -> Delivery:
        room.last_seq = seqs[-1]
        room.known = True
        self.stats.events_accepted += len(accepted)
        if room.joining:
            pairs = list(zip(seqs, accepted))
            for buffered in room.joining.values():
                buffered.extend(pairs)
        delivery = Delivery(room, frame_events(accepted), len(accepted))
        if room.catching_up:
            self._catch_up(room, seqs, accepted, delivery)
        return delivery

    def _catch_up(self, room: Room, seqs: list[int], accepted: list[bytes], delivery: Delivery) -> None:
        for member, (writer, floor) in list(room.catching_up.items()):
            if seqs[-1] <= floor:
                continue  # it already has all of these
            if seqs[0] > floor:
                # Caught up: from now on the shared buffer, starting with this one.
                del room.catching_up[member]
                room.set_member(member, writer)
            else:
                start = next(i for i, s in enumerate(seqs) if s > floor)
                if delivery.extra is None:
                    delivery.extra = []
                delivery.extra.append((writer, frame_events(accepted[start:])))
                room.catching_up[member] = (writer, seqs[-1])

    def channels(self) -> list[bytes]:
        """Every channel that has local sockets: what a reconnected subscriber re-subscribes."""
        return list(self.by_channel)
