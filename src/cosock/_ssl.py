"""TLS over accelerated CoSockets.

``ssl.SSLSocket`` hands its file descriptor to OpenSSL, which then reads and writes the
kernel socket directly.  On an accelerated CoSocket that fd carries cosock control frames,
not the byte stream, so the stock class cannot work there.  :class:`CoSSLSocket` is an
``ssl.SSLSocket`` (``isinstance`` checks and every pure-Python method of the stdlib class
are kept) *and* a :class:`CoSocket`; ``SSLContext.sslsocket_class`` points at it while
cosock is enabled.  Where the stdlib would create OpenSSL's socket-bound object, an
accelerated connection gets :class:`_BioTransport` instead: an ``SSLObject`` over two
``MemoryBIO`` whose ciphertext travels through ``CoSocket.send``/``recv`` (ring or TCP,
whatever the connection uses), with the C module's blocking, timeout and non-blocking
(``SSLWantReadError``/``SSLWantWriteError``) behaviour.  Plain-TCP CoSockets keep
OpenSSL's own fd I/O.

Ciphertext is read one TLS record at a time, like OpenSSL without read-ahead: bytes after
the current record stay in the ring, so readiness stays exact for select-based callers and
``unwrap()`` leaves the plaintext that follows close_notify unread on the socket.
"""

from __future__ import annotations

import errno
import ssl
import threading
import time
import weakref
from typing import Any

from ._selectors import track, untrack
from ._socket import CoSocket

#: TLS record header: type (1), version (2), length (2).
_HEADER = 5
#: Largest record body a peer may send (TLS 1.2 ciphertext: 2^14 + 2048).
_MAX_BODY = (1 << 14) + 2048
#: What the stdlib class was before enable(); CoSSLSocket hands foreign sockets to it.
_StdSSLSocket = ssl.SSLSocket


class _BioTransport:
    """Stands in for OpenSSL's socket-bound object (``SSLSocket._sslobj``): the same
    methods, driven over the CoSocket's own send/recv."""

    def __init__(
        self,
        sock: CoSSLSocket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None,
        session: ssl.SSLSession | None,
    ) -> None:
        # Weak, like OpenSSL's owner reference: a dropped socket is freed (and its fd
        # closed) at once, not when the cycle collector finds the pair.
        self._owner = weakref.ref(sock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in, self._out, server_side, server_hostname, session=session
        )
        self._record = bytearray()  # a partial incoming record
        self._pending_out = bytearray()  # ciphertext not yet taken by the transport
        self._retry: int | None = None  # a write accepted, its ciphertext not all sent
        self._lock = threading.RLock()  # the SSLObject and both BIOs
        self._out_lock = threading.Lock()  # _pending_out
        self._send_lock = threading.Lock()  # one flusher at a time keeps records in order
        self._recv_lock = threading.Lock()  # one record reader at a time

    @property
    def _sock(self) -> CoSSLSocket:
        sock = self._owner()
        if sock is None:
            raise OSError(errno.EBADF, "Bad file descriptor: the SSL socket is gone")
        return sock

    # Everything without I/O (cipher, version, getpeercert, session, ...) is the SSLObject's.
    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    @property
    def context(self) -> ssl.SSLContext:
        return self._obj.context

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._obj.context = ctx

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj.session

    @session.setter
    def session(self, session: ssl.SSLSession) -> None:
        self._obj.session = session

    # ------------------------------------------------------------------ operations

    def do_handshake(self) -> None:
        self._run(self._obj.do_handshake, "handshake")

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if buffer is not None:
            return self._run(lambda: self._obj.read(len, buffer), "read")
        return self._run(lambda: self._obj.read(len), "read")

    def write(self, data: Any) -> int:
        if self._retry is not None:  # OpenSSL's contract: the caller retries the same write
            self._flush(self._deadline())
            n, self._retry = self._retry, None
            return n
        with self._lock:
            n = self._obj.write(data)
            self._collect()
        try:
            self._flush(self._deadline())
        except (ssl.SSLWantWriteError, TimeoutError):
            self._retry = n
            raise
        return n

    def shutdown(self) -> CoSSLSocket:
        """Send close_notify and wait for the peer's (``unwrap()``)."""
        self._run(self._obj.unwrap, "read")
        return self._sock

    def verify_client_post_handshake(self) -> None:
        with self._lock:
            self._obj.verify_client_post_handshake()
            self._collect()
        self._flush(self._deadline())

    # ------------------------------------------------------------------ transport

    def _deadline(self) -> float | None:
        """None: block; 0.0: never wait; else the monotonic time the operation times out."""
        timeout = CoSocket.gettimeout(self._sock)
        if timeout is None or timeout == 0.0:
            return timeout
        return time.monotonic() + timeout

    def _run(self, op: Any, what: str) -> Any:
        """Run an SSLObject operation to completion, moving ciphertext as it asks."""
        deadline = self._deadline()
        while True:
            want: ssl.SSLWantReadError | None = None
            with self._lock:
                try:
                    result = op()
                except ssl.SSLWantReadError as exc:
                    want = exc
                self._collect()
            if want is None:
                # A read's data is the caller's now: what it made us send (a key update,
                # say) goes as far as it can, the rest with the next operation.
                self._flush(deadline, best_effort=what == "read")
                return result
            self._flush(deadline)
            if not self._fill(deadline, what, want):
                with self._lock:  # the transport ended: the SSLObject says how
                    try:
                        return op()
                    finally:
                        self._collect()

    def _collect(self) -> None:
        """Move what OpenSSL wrote into the send queue (called with ``_lock`` held)."""
        if self._out.pending:
            data = self._out.read()
            with self._out_lock:
                self._pending_out += data

    def _flush(self, deadline: float | None, best_effort: bool = False) -> None:
        """Send queued ciphertext.  Non-blocking: ``SSLWantWriteError`` when the peer has
        no room (nothing is lost: the rest goes with the next call), unless best_effort."""
        if not self._pending_out:
            return
        with self._send_lock:
            while True:
                with self._out_lock:
                    chunk = bytes(self._pending_out[: 1 << 20])
                if not chunk:
                    return
                try:
                    n = self._transport(CoSocket.send, chunk, deadline, "write")
                except BlockingIOError:
                    if best_effort:
                        return
                    raise ssl.SSLWantWriteError(
                        ssl.SSL_ERROR_WANT_WRITE, "The operation did not complete (write)"
                    ) from None
                with self._out_lock:
                    del self._pending_out[:n]

    def _fill(self, deadline: float | None, what: str, want: ssl.SSLWantReadError) -> bool:
        """Feed the SSLObject one more whole record; False at EOF of the transport."""
        with self._recv_lock:
            while True:
                need = _HEADER - len(self._record)
                if need <= 0:
                    body = int.from_bytes(self._record[3:5], "big")
                    # A length beyond any record is not TLS: let OpenSSL say so.
                    need = 0 if body > _MAX_BODY else _HEADER + body - len(self._record)
                if need <= 0:
                    with self._lock:
                        self._in.write(bytes(self._record))
                    self._record.clear()
                    return True
                try:
                    data = self._transport(CoSocket.recv, need, deadline, what)
                except BlockingIOError:
                    raise want from None
                if not data:
                    with self._lock:
                        if self._record:
                            self._in.write(bytes(self._record))
                            self._record.clear()
                        self._in.write_eof()
                    return False
                self._record += data

    def _transport(self, call: Any, arg: Any, deadline: float | None, what: str) -> Any:
        """One CoSocket send/recv, waiting at most until the operation's deadline."""
        sock = self._sock
        if deadline is None or deadline == 0.0:
            return call(sock, arg)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"The {what} operation timed out")
        saved = CoSocket.gettimeout(sock)
        CoSocket.settimeout(sock, left)
        try:
            return call(sock, arg)
        except TimeoutError:
            raise TimeoutError(f"The {what} operation timed out") from None
        finally:
            CoSocket.settimeout(sock, saved)


class CoSSLSocket(ssl.SSLSocket, CoSocket):  # type: ignore[misc]
    """``ssl.SSLSocket`` whose TLS records travel through the CoSocket data path."""

    # Set by SSLSocket._create (the stdlib declares none of them).
    _sslobj: Any
    _context: ssl.SSLContext
    _session: ssl.SSLSession | None
    _connected: bool
    do_handshake_on_connect: bool

    @classmethod
    def _create(  # type: ignore[override]
        cls,
        sock: Any,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        context: ssl.SSLContext | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        args = (server_side, do_handshake_on_connect, suppress_ragged_eofs, server_hostname)
        if not isinstance(sock, CoSocket) or not sock._eligible():
            base: Any = _StdSSLSocket._create.__func__  # type: ignore[attr-defined]
            return base(_StdSSLSocket, sock, *args, context=context, session=session)  # type: ignore[no-any-return]
        moved = _take_state(sock)
        try:
            self: CoSSLSocket = ssl.SSLSocket._create.__func__(  # type: ignore[attr-defined]
                cls,
                sock,
                server_side,
                False,  # the handshake must wait until the channel is ours
                suppress_ragged_eofs,
                server_hostname,
                context=context,
                session=session,
            )
        except BaseException:
            _give_state(sock, moved)
            raise
        _give_state(self, moved)
        self.do_handshake_on_connect = do_handshake_on_connect
        if self._sslobj is not None and self._accelerated():
            self._sslobj = self._bio_transport()
        if self._connected and do_handshake_on_connect:
            try:
                if self.gettimeout() == 0.0:
                    raise ValueError(
                        "do_handshake_on_connect should not be specified for non-blocking sockets"
                    )
                self.do_handshake()
            except (OSError, ValueError):
                self.close()
                raise
        return self

    def _accelerated(self) -> bool:
        """Does the byte stream go anywhere but the raw fd (a channel, or bytes owed)?"""
        return self._co is not None or bool(self._rxb) or bool(self._txb)

    def _bio_transport(self) -> _BioTransport:
        return _BioTransport(
            self, self._context, self.server_side, self.server_hostname, self._session
        )

    def _real_connect(self, addr: Any, connect_ex: bool) -> int | None:
        if self.server_side:
            raise ValueError("can't connect in server-side mode")
        if self._connected or self._sslobj is not None:
            raise ValueError("attempt to connect already-connected SSLSocket!")
        rc: int | None = None
        try:
            try:
                CoSocket.connect(self, addr)
            except BlockingIOError as exc:
                if not connect_ex:
                    raise
                rc = exc.errno or errno.EINPROGRESS
            except OSError as exc:
                if not connect_ex or exc.errno is None:
                    raise
                rc = exc.errno
            if self._accelerated():
                self._sslobj = self._bio_transport()
            else:
                self._sslobj = self.context._wrap_socket(  # type: ignore[attr-defined]
                    self, False, self.server_hostname, owner=self, session=self._session
                )
            if not rc:
                self._connected = True
                if self.do_handshake_on_connect:
                    self.do_handshake()
            return rc
        except (OSError, ValueError):
            self._sslobj = None
            raise


_STATE = ("_co", "_rv", "_rxb", "_txb", "_reason", "_shut_after_flush")


def _take_state(sock: CoSocket) -> dict[str, Any]:
    """Detach the channel (and listener registration) from ``sock`` without ending them,
    so that ``SSLSocket._create``'s ``sock.detach()`` leaves them alive for the new object."""
    state = {name: getattr(sock, name) for name in _STATE}
    if sock._co is not None:
        untrack(sock, sock.fileno())
    sock._co = None
    sock._rv = sock._rxb = sock._txb = None
    return state


def _give_state(sock: CoSocket, state: dict[str, Any]) -> None:
    for name in _STATE:
        setattr(sock, name, state[name])
    if sock._co is not None and sock.fileno() != -1:
        CoSocket.settimeout(sock, CoSocket.gettimeout(sock))  # the kernel fd non-blocking
        track(sock)
