"""A MALICIOUS untrusted library, for tests: it attacks the traffic it relays.

The real library (:class:`~sgmonitor.untrusted.library.SecureMonitor`) forwards the
enclave's sealed requests and the hypervisor's sealed replies unchanged. This one holds
the same position (it sees and can rewrite every byte between the two) and attacks one
reply per session, chosen so the attack bites (a reply that carries at least two pages,
or for ``inject`` none, after the scan has started). A reply's pages travel as one
sealed block, each page's ciphertext at its place in the index's order, so the relay
can cut and splice them:

- ``flip``: one bit of the sealed pages is flipped;
- ``replay``: the previous reply of the session is delivered again instead;
- ``reorder``: the pages' ciphertexts arrive in reverse order (the tag stays last);
- ``swap-address``: the first page's ciphertext is replaced by a genuine one of another
  address (the first page of an earlier reply of the same session);
- ``swap-guest``: the sealed pages are replaced by genuine ones of another guest's
  session (recorded by another ``MaliciousMonitor`` sharing the same
  :class:`Recording`), same request number, session id rewritten to look right;
- ``inject``: a reply whose index names no page gets the genuine sealed pages of an
  earlier reply of the session (the one attack on a reply without pages);
- ``drop``: the reply is swallowed: the enclave's OCALL never returns;
- ``replay-session``: every reply of a new session is answered from a recording of an
  earlier, complete session, without asking the hypervisor at all.

The clear-text fields (session id, request id) are kept consistent where that helps
the attack look genuine; the enclave ignores them anyway and rebuilds the associated
data from what it expects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from sgmonitor.untrusted.library import SecureMonitor
from sgmonitor.wire.core import decode, encode
from sgmonitor.wire.sealed import PAGE_SIZE, Reply, Request

__all__ = ["Attack", "MaliciousMonitor", "Recording"]


class Attack(StrEnum):
    """What the malicious relay does to one reply."""

    FLIP = "flip"
    REPLAY = "replay"
    REORDER = "reorder"
    SWAP_ADDRESS = "swap-address"
    SWAP_GUEST = "swap-guest"
    INJECT = "inject"
    DROP = "drop"
    REPLAY_SESSION = "replay-session"


@dataclass
class Recording:
    """Genuine replies seen by a relay, per session in order (request 1, 2, ...)."""

    sessions: list[list[Reply]] = field(default_factory=list)

    def last_complete(self) -> list[Reply]:
        """The replies of the most recent session that had any."""
        for replies in reversed(self.sessions):
            if replies:
                return replies
        return []

    def all_replies(self) -> Iterable[Reply]:
        for replies in self.sessions:
            yield from replies


class MaliciousMonitor(SecureMonitor):
    """A :class:`SecureMonitor` whose relay attacks one reply per session.

    ``attack=None`` relays honestly and only records (the other guest of
    ``swap-guest``, the first session of ``replay-session``). ``attacked`` says whether
    the attack has been carried out in the current session.
    """

    def __init__(
        self,
        *args: Any,
        attack: Attack | None = None,
        recording: Recording | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack
        self.recording = recording if recording is not None else Recording()
        self.attacked = False
        self._own: list[Reply] = []
        self._requests = 0

    def open_session(self) -> None:
        self._own = []
        self.recording.sessions.append(self._own)
        self._requests = 0
        self.attacked = False
        super().open_session()

    def _relay(self, frame: bytes, timeout: float) -> bytes | None:
        if len(frame) < 2 or frame[1] != Request.TYPE:
            return super()._relay(frame, timeout)  # session set-up: leave it alone
        request = decode(frame, expect=(Request,))
        self._requests += 1
        if self.attack is Attack.REPLAY_SESSION:
            return self._replay_session(request)
        answer = super()._relay(frame, timeout)
        if answer is None or answer[1] != Reply.TYPE:
            return answer
        reply = decode(answer, expect=(Reply,))
        earlier = list(self._own)
        self._own.append(reply)
        if self.attack is None or self.attacked or not self._bites(reply):
            return answer
        forged = self._forge(reply, earlier)
        if forged is _NOT_YET:
            return answer
        self.attacked = True
        assert forged is None or isinstance(forged, Reply)
        return None if forged is None else encode(forged)

    def _bites(self, reply: Reply) -> bool:
        """Whether the attack is for this reply: ``inject`` takes one without pages,
        every other attack one with at least two."""
        if self.attack is Attack.INJECT:
            return _page_count(reply) == 0
        return _page_count(reply) >= 2

    def _forge(self, reply: Reply, earlier: list[Reply]) -> Reply | object | None:
        """The attacked reply (None: drop it), or ``_NOT_YET`` to wait for a better one."""
        block = bytearray(reply.sealed_pages)
        if self.attack is Attack.FLIP:
            block[100] ^= 0x04
        elif self.attack is Attack.REPLAY:
            if not earlier:
                return _NOT_YET
            return earlier[-1]
        elif self.attack is Attack.REORDER:
            n = _page_count(reply)
            pages = [block[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(n)]
            block[: n * PAGE_SIZE] = b"".join(reversed(pages))
        elif self.attack in (Attack.SWAP_ADDRESS, Attack.INJECT):
            donor = next((r for r in reversed(earlier) if _page_count(r)), None)
            if donor is None:
                return _NOT_YET
            if self.attack is Attack.INJECT:
                block = bytearray(donor.sealed_pages)
            else:
                block[:PAGE_SIZE] = donor.sealed_pages[:PAGE_SIZE]
        elif self.attack is Attack.SWAP_GUEST:
            other = self._other_guest_reply(reply.request_id)
            if other is None:
                return _NOT_YET
            block = bytearray(other.sealed_pages)
        elif self.attack is Attack.DROP:
            return None
        return replace(reply, sealed_pages=bytes(block))

    def _other_guest_reply(self, request_id: int) -> Reply | None:
        """A genuine reply with pages from another session (another guest), preferably
        to the same request number."""
        own = {id(r) for r in self._own}
        others = [r for r in self.recording.all_replies() if id(r) not in own and _page_count(r)]
        same = [r for r in others if r.request_id == request_id]
        found = same or others
        return found[0] if found else None

    def _replay_session(self, request: Request) -> bytes:
        """Answer from the recording of an earlier session, never asking the hypervisor."""
        old = self.recording.last_complete()  # this session records nothing itself
        index = min(self._requests - 1, len(old) - 1)
        if index < 0:
            raise RuntimeError("replay-session needs a recorded session first")
        self.attacked = True
        stale = old[index]
        # make the clear-text fields match the new session; the seal still won't
        return encode(replace(stale, session_id=request.session_id))


_NOT_YET = object()


def _page_count(reply: Reply) -> int:
    """How many pages a reply's sealed block carries (its tag or AD is under a page)."""
    return len(reply.sealed_pages) // PAGE_SIZE
