"""The enclave's end of the sealed channel: a ``PageTransport`` over OCALLs.

Each call seals one request (kind REQUEST), hands the encoded hypervisor-link frame to
the untrusted host (``ocall_hv_exchange``), and opens what comes back: the sealed index
first (kind REPLY), then the PRESENT pages, sealed together in the index's order
(kind PAGE: the first page's address and their total length in the associated data).
The untrusted host sees only ciphertext, and anything it does to the answer (flip,
replay, reorder, move between addresses, sessions or guests, drop, truncate) ends in
:class:`SessionFailed`: an ``InvalidSeal`` from the channel, a block whose length does
not match the index, or a deadline. Nothing from a failed reply is
returned, and once failed the transport refuses every later call, so no code above it
can go on with guest data from a session that saw a forgery.

A clear-text ``Error`` from the hypervisor link is unauthenticated: it fails the session
too, and is never taken as a statement about the guest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from sgmonitor.channel import (
    ChannelClosed,
    ChannelExhausted,
    InvalidSeal,
    Kind,
    SealingChannel,
    SessionExpired,
    Suite,
)
from sgmonitor.errors import PageFault, SGMonitorError
from sgmonitor.wire.core import Error, ErrorCode, Message, WireError, WireTimeout, decode, encode
from sgmonitor.wire.sealed import (
    MAX_LIST_NODES,
    MAX_PAGES_PER_REQUEST,
    PAGE_SIZE,
    Ack,
    Batch,
    BatchReply,
    BeginScan,
    EndScan,
    FollowList,
    GetRegisters,
    GetVmcoreinfo,
    ListEnd,
    ListReply,
    ListWalk,
    PageIndex,
    PageRange,
    PagesReply,
    PageStatus,
    ReadPages,
    RegistersReply,
    Reply,
    Request,
    RequestFailed,
    VmcoreinfoReply,
)

__all__ = ["Exchange", "ExchangeFailed", "RemoteListWalk", "SealedTransport", "SessionFailed"]

# Send an encoded hypervisor-link frame (timeout in seconds) now; the call it returns
# waits for the encoded answer. One exchange is out at a time.
Exchange = Callable[[bytes, float], Callable[[], bytes]]


class SessionFailed(SGMonitorError):
    """The session with the hypervisor is over: forged or missing replies, a clear-text
    ``Error``, or an authenticated refusal. Never guest data; open a new session."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ExchangeFailed(SGMonitorError):
    """The untrusted host could not (or would not) deliver an exchange."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_FORGED = (
    "a reply from the hypervisor did not authenticate: tampered, replayed, reordered, "
    "moved or from another session or guest"
)


@dataclass(frozen=True)
class RemoteListWalk:
    """The hypervisor's ``follow_list`` answer (``sgmonitor.enclave.memory.ListPages``)."""

    nodes: tuple[int, ...]
    end: ListEnd
    pages: Mapping[int, bytes | PageFault] = field(repr=False)


class SealedTransport:
    """``PageTransport`` for one session: every call is one OCALL, one crossing."""

    def __init__(
        self,
        channel: SealingChannel,
        exchange: Exchange,
        *,
        timeout: float = 30.0,
        pause: bool = True,
    ) -> None:
        self.channel = channel
        self.session_id = channel.session_id
        self.exchange = exchange
        self.timeout = timeout
        self.pause = pause
        self.sealed = channel.suite is not Suite.UNSEALED_FOR_EXPERIMENTS_ONLY
        self.failure: SessionFailed | None = None
        self._next_request = 1
        self.crossings = 0  # every OCALL this transport made
        self.bytes_opened = 0  # payload bytes of opened replies and pages
        self.bytes_decrypted = 0  # the same, when the suite encrypts
        self.crossing_s = 0.0  # time spent outside the enclave waiting for OCALLs
        self.opening_s = 0.0  # time spent opening (decrypting, decoding) what came back
        # A BeginScan not sent yet: it rides in the scan's first request (one Batch).
        self._begin: BeginScan | None = None
        self.paused = False  # the hypervisor said the guest is paused for this scan
        self._out: _Sent | None = None  # the request whose answer is still out

    # --- PageTransport -----------------------------------------------------------------

    def read_pages(self, addresses: Sequence[int]) -> list[bytes | PageFault]:
        """Each page-aligned address -> its 4 KiB or its authenticated fault, in order."""
        if not 0 < len(addresses) <= MAX_PAGES_PER_REQUEST:
            raise ValueError(f"read_pages takes 1..{MAX_PAGES_PER_REQUEST} addresses")
        ((index, pages),) = self._call_all([ReadPages(_ranges(addresses))], [PagesReply])
        return self._page_values(index, pages, addresses)

    def _page_values(
        self, index: Message, pages: list[bytes], addresses: Sequence[int]
    ) -> list[bytes | PageFault]:
        assert isinstance(index, PagesReply)
        if list(index.pages.addresses) != list(addresses):
            self._fail(ErrorCode.BAD_REQUEST, "the reply index names other pages than asked")
        by_address = _values(index.pages, pages)
        return [by_address[a] for a in addresses]

    def follow_list_later(
        self, walk: ListWalk, *, pages: Sequence[int] = (), then: int = 0
    ) -> Callable[[], RemoteListWalk]:
        """Send a ``follow_list`` (with ``pages`` read in the same crossing) now, and
        take its answer when the returned call is made: the hypervisor walks, and the
        relay carries its reply, while the enclave works on what it has. Any other call
        first takes this answer in (one exchange is out at a time), so the order of
        sealed requests and replies never changes. ``then`` announces the next window's
        length (``FollowList.then``): the hypervisor walks it ahead."""
        sent = self._send_all(*self._list_requests(walk, pages, then))

        def answer() -> RemoteListWalk:
            return self._list_walk(self._receive_all(sent), pages)

        return answer

    def follow_list(self, walk: ListWalk, *, pages: Sequence[int] = ()) -> RemoteListWalk:
        """Have the hypervisor walk a ``list_head`` list (at most ``MAX_LIST_NODES``
        nodes of it). ``pages`` (at most ``MAX_PAGES_PER_REQUEST``) are read in the same
        crossing and returned with the walk's."""
        return self.follow_list_later(walk, pages=pages)()

    def _list_requests(
        self, walk: ListWalk, pages: Sequence[int], then: int = 0
    ) -> tuple[list[Message], list[type[Message]]]:
        limit = min(walk.limit, MAX_LIST_NODES)
        request = FollowList(replace(walk, limit=limit), min(then, MAX_LIST_NODES))
        if not pages:
            return [request], [ListReply]
        if len(pages) > MAX_PAGES_PER_REQUEST:
            raise ValueError(f"follow_list reads at most {MAX_PAGES_PER_REQUEST} more pages")
        return [request, ReadPages(_ranges(pages))], [ListReply, PagesReply]

    def _list_walk(
        self, answers: list[tuple[Message, list[bytes]]], pages: Sequence[int]
    ) -> RemoteListWalk:
        (index, found), *more = answers
        assert isinstance(index, ListReply)
        values: dict[int, bytes | PageFault] = {}
        if more:
            ((read, extra),) = more
            values.update(zip(pages, self._page_values(read, extra, pages), strict=True))
        values.update(_values(index.pages, found))
        return RemoteListWalk(index.entries, index.end, values)

    def begin_scan(self) -> None:
        """A scan starts: the hypervisor refreshes its registers and page tables (and,
        with ``pause``, stops the guest until :meth:`end_scan`). Sent with the scan's
        first request, in the same crossing."""
        self._begin = BeginScan(self.pause)
        self.paused = False

    # --- more requests -----------------------------------------------------------------

    def end_scan(self) -> None:
        """The scan is over: an answer still out is taken in (the next ECALL must not
        find it), and the hypervisor resumes the guest if it paused it (a scan that
        paused nothing, or made no request at all, needs no crossing for that)."""
        self._settle()
        if self._begin is not None:
            self._begin = None  # nothing was asked, nothing was paused
            return
        if self.paused:
            self._call_all([EndScan()], [Ack])
            self.paused = False

    def vmcoreinfo_notes(self) -> tuple[bytes, ...]:
        """Every VMCOREINFO note the hypervisor found in guest RAM (genuine or planted)."""
        if self._begin is not None:  # GetVmcoreinfo can't be batched: begin first
            self._call_all([], [])
        index, _ = self._call(GetVmcoreinfo(), (VmcoreinfoReply,))
        assert isinstance(index, VmcoreinfoReply)
        return index.notes

    def registers(self) -> RegistersReply:
        """Each vCPU's control registers."""
        ((index, _),) = self._call_all([GetRegisters()], [RegistersReply])
        assert isinstance(index, RegistersReply)
        return index

    # --- one sealed round trip ---------------------------------------------------------

    def _call_all(
        self, requests: list[Message], expect: list[type[Message]]
    ) -> list[tuple[Message, list[bytes]]]:
        """``requests`` (with a pending BeginScan first) in one crossing: one Batch when
        more than one; each answer checked against its expected type; fail closed."""
        return self._receive_all(self._send_all(requests, expect))

    def _send_all(self, requests: list[Message], expect: list[type[Message]]) -> _SentAll:
        """:meth:`_call_all`'s first half: send, and say what to expect back."""
        begin = self._begin
        if begin is not None:
            requests, expect = [begin, *requests], [Ack, *expect]
            self._begin = None
        if len(requests) == 1:
            return _SentAll(self._send(requests[0]), expect, begin is not None, batched=False)
        return _SentAll(self._send(Batch(tuple(requests))), expect, begin is not None, True)

    def _receive_all(self, sent: _SentAll) -> list[tuple[Message, list[bytes]]]:
        """:meth:`_call_all`'s second half: the answers, checked, in request order."""
        expect = sent.expect
        if not sent.batched:
            out = [self._receive(sent.sent, (expect[0],))]
        else:
            index, pages = self._receive(sent.sent, (BatchReply,))
            assert isinstance(index, BatchReply)
            if len(index.replies) != len(expect):
                self._fail(ErrorCode.BAD_REQUEST, "the batch reply has another number of answers")
            out, at = [], 0
            for reply, wanted in zip(index.replies, expect, strict=True):
                if isinstance(reply, RequestFailed):
                    self._fail(reply.code, f"hypervisor refused: {reply.message}")
                if not isinstance(reply, wanted):
                    self._fail(ErrorCode.BAD_REQUEST, f"a {type(reply).__name__} in the batch")
                n = len(reply.present()) if isinstance(reply, PagesReply | ListReply) else 0
                out.append((reply, pages[at : at + n]))
                at += n
        if not sent.began:
            return out
        ack = out[0][0]
        assert isinstance(ack, Ack)
        self.paused = ack.paused
        return out[1:]

    def _fail(self, code: ErrorCode, message: str) -> SessionFailed:
        if self.failure is None:
            self.failure = SessionFailed(code, message)
            self.channel.close()
        raise self.failure

    def _call(
        self, request: Message, expect: tuple[type[Message], ...]
    ) -> tuple[Message, list[bytes]]:
        """Seal ``request``, exchange it, open the index and its pages; fail closed."""
        return self._receive(self._send(request), expect)

    def _send(self, request: Message) -> _Sent:
        """Seal ``request`` and hand it to the host (after taking in any answer still
        out); :meth:`_receive` opens what comes back."""
        self._settle()
        if self.failure is not None:
            raise self.failure
        rid = self._next_request
        self._next_request += 1
        with self._failing_closed():
            sealed = self.channel.seal(Kind.REQUEST, rid, encode(request))
            frame = encode(Request(self.session_id, rid, sealed))
            self.crossings += 1
            started = time.perf_counter()
            try:
                answer = self.exchange(frame, self.timeout)
            finally:
                self.crossing_s += time.perf_counter() - started
        sent = self._out = _Sent(rid, answer)
        return sent

    def _settle(self) -> None:
        """Take in the answer still out, if any (kept for whoever asked for it)."""
        if self._out is not None:
            self._receive(self._out, None)

    def _receive(
        self, sent: _Sent, expect: tuple[type[Message], ...] | None
    ) -> tuple[Message, list[bytes]]:
        """Wait for ``sent``'s answer and open it (once: a settled answer is kept);
        ``expect`` None takes any reply, checked when its asker comes for it."""
        if sent.opened is None:
            if self.failure is not None:
                raise self.failure
            self._out = None
            sent.opened = self._open(sent)
        index, pages = sent.opened
        if expect is not None and not isinstance(index, expect):
            self._fail(ErrorCode.BAD_FRAME, f"malformed reply: a {type(index).__name__}")
        return index, pages

    def _open(self, sent: _Sent) -> tuple[Message, list[bytes]]:
        rid = sent.request_id
        with self._failing_closed():
            started = time.perf_counter()
            try:
                reply = sent.answer()
            finally:
                arrived = time.perf_counter()
                self.crossing_s += arrived - started
            answer = decode(reply, expect=(Reply, Error))
            if isinstance(answer, Error):  # clear text: unauthenticated
                self._fail(
                    answer.code, f"hypervisor link error (unauthenticated): {answer.message}"
                )
            assert isinstance(answer, Reply)
            body = self.channel.open(Kind.REPLY, rid, answer.sealed_reply)
            index: Message = decode(body, expect=(*_REPLIES, RequestFailed))
            if isinstance(index, RequestFailed):
                self._fail(index.code, f"hypervisor refused: {index.message}")
            present = (
                index.present() if isinstance(index, PagesReply | ListReply | BatchReply) else []
            )
            pages = self._open_pages(rid, answer.sealed_pages, present)
            self.opening_s += time.perf_counter() - arrived
        opened = len(body) + PAGE_SIZE * len(pages)
        self.bytes_opened += opened
        if self.sealed:
            self.bytes_decrypted += opened
        return index, pages

    def _open_pages(self, rid: int, sealed: bytes | memoryview, present: list[int]) -> list[bytes]:
        """The pages of one sealed block, in the index's order; a block where the index
        names no page, or none where it names some, is a forgery."""
        if not present:
            if sealed:
                raise InvalidSeal()
            return []
        size = PAGE_SIZE * len(present)
        block = self.channel.open(Kind.PAGE, rid, sealed, address=present[0], length=size)
        return [block[at : at + PAGE_SIZE] for at in range(0, size, PAGE_SIZE)]

    @contextlib.contextmanager
    def _failing_closed(self) -> Iterator[None]:
        """Any failure of the channel or the exchange fails the session."""
        try:
            yield
        except (InvalidSeal, ChannelClosed):
            self._fail(ErrorCode.INVALID_SEAL, _FORGED)
        except (SessionExpired, ChannelExhausted) as exc:
            self._fail(ErrorCode.TIMEOUT, f"session over: {exc}")
        except WireTimeout as exc:
            self._fail(ErrorCode.TIMEOUT, f"no reply from the hypervisor in time ({exc})")
        except ExchangeFailed as exc:
            self._fail(exc.code, f"the untrusted host could not relay: {exc}")
        except WireError as exc:
            self._fail(ErrorCode.BAD_FRAME, f"malformed reply: {exc}")


@dataclass(frozen=True)
class _SentAll:
    """What :meth:`SealedTransport._send_all` sent: the request (a Batch or not), the
    answers expected, and whether a BeginScan went first."""

    sent: _Sent
    expect: list[type[Message]]
    began: bool
    batched: bool


@dataclass
class _Sent:
    """A request handed to the host: its id, the call that waits for its answer, and
    the opened answer once taken in."""

    request_id: int
    answer: Callable[[], bytes]
    opened: tuple[Message, list[bytes]] | None = None


# Every reply the index of an answer may be (each asker checks for its own).
_REPLIES = (
    Ack,
    BatchReply,
    ListReply,
    PagesReply,
    RegistersReply,
    VmcoreinfoReply,
)


def _ranges(addresses: Sequence[int]) -> tuple[PageRange, ...]:
    """Consecutive pages as one range each, in the order asked."""
    out: list[list[int]] = []
    for a in addresses:
        if out and a == out[-1][0] + out[-1][1] * PAGE_SIZE:
            out[-1][1] += 1
        else:
            out.append([a, 1])
    return tuple(PageRange(a, n) for a, n in out)


def _values(index: PageIndex, pages: Sequence[bytes]) -> dict[int, bytes | PageFault]:
    """Address -> page bytes, or the fault the authenticated index reports."""
    if len(pages) == len(index):  # every page present: the common case
        return dict(zip(index.addresses, pages, strict=True))
    it = iter(pages)
    out: dict[int, bytes | PageFault] = {}
    for address, status in zip(index.addresses, index.statuses, strict=True):
        if status == PageStatus.PRESENT:
            out[address] = next(it)
        elif status == PageStatus.NOT_RAM:
            out[address] = PageFault(address, 0, None, "translates outside guest RAM")
        else:
            out[address] = PageFault(address, 0, None, "not present (hypervisor page walk)")
    return out
