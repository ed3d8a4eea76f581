//! WebSocket frames on the server side (RFC 6455), with a connection's buffers held only while
//! a message is in flight.
//!
//! An agent's connection is open for days and carries a message every heartbeat, so what it
//! holds between messages is paid per agent for good. tungstenite keeps a read buffer per
//! connection that grows to the largest message the agent ever sent (a collector's first report
//! is several KB) and never shrinks: at 10k collectors that buffer was the largest single item of
//! memory per agent. Here a read lands in a buffer on the stack; only a message that arrives in
//! pieces, or bytes that run past one, go to the heap, and that buffer is freed once it is empty.
//! A write goes to the socket from the stack too, and only what the socket does not take at once
//! is kept until it does.
//!
//! The frame header is parsed by tungstenite ([`FrameHeader`]), whose accept key of the
//! handshake is used too; the server's own headers are written here (`server_header`, tested
//! against tungstenite's). What is ours is the buffering, the checks a server makes of a
//! client's frames, and the assembly of fragmented messages.
use std::io::{self, Cursor, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
pub use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};

use crate::protocol::codec;

/// Bytes read at once into the stack: a heartbeat, a reply to a push and most reports fit.
const STACK_READ: usize = 2048;
/// Frames up to this size are written from the stack in one write.
const STACK_WRITE: usize = 2048;
/// Frames up to this size are copied into one buffer and sent with one `send`.
const SMALL_WRITE: usize = 256;
/// The most a read into the heap buffer asks for at once.
const HEAP_READ: usize = 64 << 10;
/// Control frames carry at most this many bytes (RFC 6455 §5.5).
const MAX_CONTROL: u64 = 125;

/// Why a WebSocket request cannot be upgraded, as the status and text of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub http::StatusCode, pub &'static str);

/// Checks the request's upgrade headers (RFC 6455 §4.2.1) and returns the value of the reply's
/// `Sec-WebSocket-Accept`.
pub fn accept(headers: &HeaderMap) -> Result<HeaderValue, Refused> {
    use http::StatusCode;
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err(Refused(StatusCode::BAD_REQUEST, "Connection header did not include 'upgrade'"));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err(Refused(StatusCode::BAD_REQUEST, "`Upgrade` header did not include 'websocket'"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err(Refused(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Version` header did not include '13'"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(Refused(StatusCode::BAD_REQUEST, "`Sec-WebSocket-Key` header missing"));
    };
    Ok(HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header value"))
}

/// What a connection accepts from its peer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest message, whole or in fragments, in bytes.
    pub max_message: usize,
}

/// A message from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Binary(Bytes),
    /// A text message (its first frame: the connection is closed for it, so it is not assembled).
    Text,
    Ping(Bytes),
    Pong,
    /// A Close frame, with its status code if it had one.
    Close(Option<CloseCode>),
}

/// Why a connection cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The reading half of a connection's state: empty, and without heap, between messages.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes read but not consumed: part of a frame, or what ran past the last message.
    buf: Vec<u8>,
    /// The data message being assembled from fragments.
    fragments: Option<Vec<u8>>,
}

/// One frame found at the start of a buffer.
struct Frame {
    header: FrameHeader,
    /// Where its payload starts, and its length.
    start: usize,
    len: usize,
}

impl Frame {
    fn end(&self) -> usize {
        self.start + self.len
    }
}

impl FrameReader {
    /// A reader that starts with `read`: bytes of the connection read before it was handed over
    /// (what hyper had read past the upgrade request).
    pub fn new(read: &[u8]) -> Self {
        Self { buf: read.to_vec(), fragments: None }
    }

    /// Whether bytes of a message in flight are held (none between messages).
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0 || self.fragments.is_some()
    }

    /// Reads until a whole message arrived (`None`: the peer closed the connection). Cancel-safe:
    /// what was read stays here for the next call.
    pub fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        limits: Limits,
    ) -> Poll<Result<Option<Incoming>, FrameError>> {
        loop {
            if let Some(incoming) = self.next_buffered(limits)? {
                return Poll::Ready(Ok(Some(incoming)));
            }
            if self.buf.is_empty() {
                let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
                let mut read = ReadBuf::uninit(&mut stack);
                ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
                if read.filled().is_empty() {
                    return Poll::Ready(self.at_eof());
                }
                if let Some(incoming) = self.take_from(read.filled_mut(), limits)? {
                    return Poll::Ready(Ok(Some(incoming)));
                }
            } else {
                let want = self.wanted(limits)?.clamp(1, HEAP_READ);
                let len = self.buf.len();
                self.buf.resize(len + want, 0);
                let mut read = ReadBuf::new(&mut self.buf[len..]);
                let polled = Pin::new(&mut *io).poll_read(cx, &mut read);
                let n = read.filled().len();
                self.buf.truncate(len + n);
                ready!(polled)?;
                if n == 0 {
                    return Poll::Ready(self.at_eof());
                }
            }
        }
    }

    /// The end of the stream: clean between messages, an error inside one.
    fn at_eof(&self) -> Result<Option<Incoming>, FrameError> {
        if self.buf.is_empty() && self.fragments.is_none() {
            Ok(None)
        } else {
            Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()))
        }
    }

    /// Frames read into the stack: handled from there; only the rest goes to the heap buffer.
    fn take_from(&mut self, bytes: &mut [u8], limits: Limits) -> Result<Option<Incoming>, FrameError> {
        let mut at = 0;
        let mut found = None;
        while found.is_none() {
            let Some(frame) = parse(&bytes[at..], limits)? else { break };
            let frame = Frame { start: at + frame.start, ..frame };
            found = self.on_frame(&frame.header, &mut bytes[frame.start..frame.end()], limits)?;
            at = frame.end();
        }
        self.buf.extend_from_slice(&bytes[at..]);
        Ok(found)
    }

    /// The next message whose frames are all in the heap buffer.
    fn next_buffered(&mut self, limits: Limits) -> Result<Option<Incoming>, FrameError> {
        if self.buf.is_empty() {
            return Ok(None); // between messages, as most of the time: nothing to parse
        }
        while let Some(frame) = parse(&self.buf, limits)? {
            let mut buf = std::mem::take(&mut self.buf);
            let found = self.on_frame(&frame.header, &mut buf[frame.start..frame.end()], limits);
            buf.drain(..frame.end());
            // Freed once empty: an idle connection holds no buffer.
            self.buf = if buf.is_empty() { Vec::new() } else { buf };
            if let Some(incoming) = found? {
                return Ok(Some(incoming));
            }
        }
        Ok(None)
    }

    /// How many more bytes the frame at the start of the heap buffer needs.
    fn wanted(&self, limits: Limits) -> Result<usize, FrameError> {
        Ok(match header(&self.buf, limits)? {
            Some(frame) => frame.end().saturating_sub(self.buf.len()),
            None => 14 - self.buf.len().min(13),
        })
    }

    /// One frame, unmasked in place; the message it completes, if any.
    fn on_frame(
        &mut self,
        header: &FrameHeader,
        payload: &mut [u8],
        limits: Limits,
    ) -> Result<Option<Incoming>, FrameError> {
        let mask = header.mask.expect("parse refuses unmasked frames");
        unmask(payload, mask);
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(Some(Incoming::Ping(Bytes::copy_from_slice(payload)))),
            OpCode::Control(Control::Pong) => Ok(Some(Incoming::Pong)),
            OpCode::Control(Control::Close) => close(payload).map(|code| Some(Incoming::Close(code))),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(FrameError::Protocol("reserved opcode"))
            }
            OpCode::Data(Data::Text) if self.fragments.is_none() => Ok(Some(Incoming::Text)),
            OpCode::Data(Data::Binary) if self.fragments.is_none() => {
                if header.is_final {
                    Ok(Some(Incoming::Binary(message(payload))))
                } else {
                    self.fragments = Some(payload.to_vec());
                    Ok(None)
                }
            }
            OpCode::Data(Data::Text | Data::Binary) => {
                Err(FrameError::Protocol("a new message inside a fragmented one"))
            }
            OpCode::Data(Data::Continue) => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                };
                if fragments.len() + payload.len() > limits.max_message {
                    return Err(FrameError::TooLarge(limits.max_message));
                }
                fragments.extend_from_slice(payload);
                Ok(header
                    .is_final
                    .then(|| Incoming::Binary(self.fragments.take().unwrap_or_default().into())))
            }
        }
    }
}

thread_local! {
    /// Where [`message`] copies a message read whole on this thread (a message is handled
    /// before the next is read).
    static MESSAGES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A message read whole, out of the read buffer, into the thread's reused buffer
/// ([`codec::split_off_reused`]: no allocation per message).
fn message(payload: &[u8]) -> Bytes {
    codec::split_off_reused(&MESSAGES, payload.len(), |buf| buf.extend_from_slice(payload))
}

/// The header of the frame at the start of `bytes`, checked as a server checks a client's.
fn header(bytes: &[u8], limits: Limits) -> Result<Option<Frame>, FrameError> {
    let mut cursor = Cursor::new(bytes);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(FrameError::Protocol("reserved opcode")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(FrameError::Protocol("reserved bits set without an extension"));
    }
    if header.mask.is_none() {
        return Err(FrameError::Protocol("unmasked frame from a client"));
    }
    if let OpCode::Control(_) = header.opcode {
        if !header.is_final || len > MAX_CONTROL {
            return Err(FrameError::Protocol("fragmented or oversized control frame"));
        }
    }
    if len > limits.max_message as u64 {
        return Err(FrameError::TooLarge(limits.max_message));
    }
    Ok(Some(Frame { header, start: cursor.position() as usize, len: len as usize }))
}

/// The whole frame at the start of `bytes`, if it is all there.
fn parse(bytes: &[u8], limits: Limits) -> Result<Option<Frame>, FrameError> {
    Ok(header(bytes, limits)?.filter(|frame| frame.end() <= bytes.len()))
}

/// The status code of a Close frame's payload (RFC 6455 §5.5.1).
fn close(payload: &[u8]) -> Result<Option<CloseCode>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| FrameError::Protocol("close reason is not UTF-8"))?;
            Ok(Some(CloseCode::from(u16::from_be_bytes([*a, *b]))))
        }
    }
}

/// XORs the payload with the mask, four bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut words = payload.chunks_exact_mut(4);
    for w in &mut words {
        let unmasked = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) ^ word;
        w.copy_from_slice(&unmasked.to_ne_bytes());
    }
    // The rest starts at a multiple of four: at the mask's first byte.
    for (b, m) in words.into_remainder().iter_mut().zip(mask) {
        *b ^= m;
    }
}

/// What to send.
#[derive(Debug, Clone, Copy)]
pub enum Outgoing<'a> {
    Binary(&'a [u8]),
    Ping,
    Pong(&'a [u8]),
    Close(CloseCode, &'a str),
}

/// Writes the header of a final, unmasked frame (a server's) into `head`; returns its length.
/// By hand rather than with tungstenite's `FrameHeader::format` (through `io::Write`, its
/// length computed apart): it is written for every reply. A test compares the two.
fn server_header(opcode: OpCode, len: usize, head: &mut [u8; 10]) -> usize {
    head[0] = 0x80 | u8::from(opcode);
    match len {
        0..=125 => {
            head[1] = len as u8;
            2
        }
        126..=0xFFFF => {
            head[1] = 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

/// The writing half of a connection's state: what the socket has not taken yet of the frame
/// being written (no heap between writes).
#[derive(Debug, Default)]
pub struct FrameWriter {
    pending: Vec<u8>,
    sent: usize,
}

impl FrameWriter {
    /// Starts writing a frame: `Ready` once the socket took all of it, else `Pending` with the
    /// rest kept for [`FrameWriter::poll_finish`]. Call only when the last write finished.
    pub fn start<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        frame: Outgoing<'_>,
    ) -> Poll<io::Result<()>> {
        debug_assert!(self.pending.is_empty(), "a write is still in flight");
        let mut close = [0u8; 2 + MAX_CONTROL as usize];
        let (opcode, payload) = match frame {
            Outgoing::Binary(data) => (OpCode::Data(Data::Binary), data),
            Outgoing::Ping => (OpCode::Control(Control::Ping), &[][..]),
            Outgoing::Pong(data) => {
                (OpCode::Control(Control::Pong), &data[..data.len().min(MAX_CONTROL as usize)])
            }
            Outgoing::Close(code, reason) => {
                let reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL as usize - 2)];
                close[..2].copy_from_slice(&u16::from(code).to_be_bytes());
                close[2..2 + reason.len()].copy_from_slice(reason);
                (OpCode::Control(Control::Close), &close[..2 + reason.len()])
            }
        };
        let mut head = [0u8; 10];
        let head_len = server_header(opcode, payload.len(), &mut head);
        let total = head_len + payload.len();
        if total > STACK_WRITE {
            self.pending.reserve_exact(total);
            self.pending.extend_from_slice(&head[..head_len]);
            self.pending.extend_from_slice(payload);
            return self.poll_finish(cx, io);
        }
        let head = &head[..head_len];
        // Header and payload in one system call: a small frame (a heartbeat's reply) copied
        // together on the stack and sent, which costs the kernel less than gathering it
        // (`writev` takes the file path, `send` the socket's); larger ones gathered by the socket
        // where it can, else copied together too.
        let polled = if total <= SMALL_WRITE {
            let mut small = [0u8; SMALL_WRITE];
            small[..head_len].copy_from_slice(head);
            small[head_len..total].copy_from_slice(payload);
            Pin::new(&mut *io).poll_write(cx, &small[..total])
        } else if io.is_write_vectored() {
            Pin::new(&mut *io).poll_write_vectored(cx, &[IoSlice::new(head), IoSlice::new(payload)])
        } else {
            let mut stack = [0u8; STACK_WRITE];
            stack[..head_len].copy_from_slice(head);
            stack[head_len..total].copy_from_slice(payload);
            Pin::new(&mut *io).poll_write(cx, &stack[..total])
        };
        let written = match polled {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => 0,
        };
        if written < total {
            self.pending.extend_from_slice(&head[written.min(head_len)..]);
            self.pending.extend_from_slice(&payload[written.saturating_sub(head_len)..]);
        }
        self.poll_finish(cx, io)
    }

    /// Writes what the socket did not take yet, then flushes.
    pub fn poll_finish<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        ready!(Pin::new(&mut *io).poll_flush(cx))?;
        // Freed once written: an idle connection holds no buffer.
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const LIMITS: Limits = Limits { max_message: 1 << 16 };

    /// A client frame: masked, as a client sends it.
    fn client_frame(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let header = FrameHeader { is_final, opcode, mask: Some(mask), ..FrameHeader::default() };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    fn binary(payload: &[u8]) -> Vec<u8> {
        client_frame(OpCode::Data(Data::Binary), true, payload)
    }

    async fn read_all(bytes: Vec<u8>, chunk: usize) -> (Vec<Incoming>, Option<FrameError>, FrameReader) {
        let (mut client, mut server) = duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(chunk.max(1)) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        let error = loop {
            match poll_fn(|cx| reader.poll_read(cx, &mut server, LIMITS)).await {
                Ok(Some(incoming)) => got.push(incoming),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        writer.await.unwrap();
        (got, error, reader)
    }

    #[tokio::test]
    async fn messages_read_whole_or_byte_by_byte_hold_no_buffer_afterwards() {
        let big = vec![7u8; 40_000];
        let mut bytes = binary(b"heartbeat");
        bytes.extend(binary(&big));
        bytes.extend(binary(b""));
        for chunk in [1, 3, 100, 1 << 20] {
            let (got, error, reader) = read_all(bytes.clone(), chunk).await;
            assert!(error.is_none(), "chunk {chunk}: {error:?}");
            let want = vec![
                Incoming::Binary(Bytes::from_static(b"heartbeat")),
                Incoming::Binary(big.clone().into()),
                Incoming::Binary(Bytes::new()),
            ];
            assert_eq!(got, want, "chunk {chunk}");
            assert_eq!(reader.buf.capacity(), 0, "no buffer held between messages");
        }
    }

    #[tokio::test]
    async fn fragments_are_assembled_with_control_frames_between_them() {
        let mut bytes = client_frame(OpCode::Data(Data::Binary), false, b"ab");
        bytes.extend(client_frame(OpCode::Control(Control::Ping), true, b"p"));
        bytes.extend(client_frame(OpCode::Data(Data::Continue), false, b"cd"));
        bytes.extend(client_frame(OpCode::Data(Data::Continue), true, b"e"));
        bytes.extend(client_frame(OpCode::Control(Control::Close), true, &1000u16.to_be_bytes()));
        for chunk in [1, 5, 1 << 20] {
            let (got, error, _) = read_all(bytes.clone(), chunk).await;
            assert!(error.is_none());
            assert_eq!(
                got,
                vec![
                    Incoming::Ping(Bytes::from_static(b"p")),
                    Incoming::Binary(Bytes::from_static(b"abcde")),
                    Incoming::Close(Some(CloseCode::Normal)),
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_from_its_header() {
        // Only the header of a 1 MiB frame: refused before its payload arrives.
        let mut header = Vec::new();
        FrameHeader { opcode: OpCode::Data(Data::Binary), mask: Some([1; 4]), ..FrameHeader::default() }
            .format(1 << 20, &mut header)
            .unwrap();
        let (_, error, reader) = read_all(header, 1).await;
        assert!(matches!(error, Some(FrameError::TooLarge(_))), "{error:?}");
        assert!(reader.buf.capacity() < 64, "nothing reserved for the announced payload");
        // Fragments adding up to more than the limit.
        let piece = vec![0u8; LIMITS.max_message / 2 + 1];
        let mut bytes = client_frame(OpCode::Data(Data::Binary), false, &piece);
        bytes.extend(client_frame(OpCode::Data(Data::Continue), true, &piece));
        let (got, error, _) = read_all(bytes, 1 << 20).await;
        assert!(got.is_empty());
        assert!(matches!(error, Some(FrameError::TooLarge(_))), "{error:?}");
    }

    #[tokio::test]
    async fn frames_a_server_must_refuse_are_protocol_errors() {
        let unmasked = {
            let mut out = Vec::new();
            let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
            header.format(1, &mut out).unwrap();
            out.push(0);
            out
        };
        let mut rsv = binary(b"x");
        rsv[0] |= 0x40;
        let mut reserved = binary(b"x");
        reserved[0] = (reserved[0] & 0xf0) | 0x3;
        let cases = [
            ("unmasked", unmasked),
            ("reserved bit", rsv),
            ("reserved opcode", reserved),
            ("long ping", client_frame(OpCode::Control(Control::Ping), true, &[0; 126])),
            ("fragmented ping", client_frame(OpCode::Control(Control::Ping), false, b"")),
            ("lone continuation", client_frame(OpCode::Data(Data::Continue), true, b"x")),
            ("one-byte close", client_frame(OpCode::Control(Control::Close), true, b"x")),
            ("close reason not UTF-8", client_frame(OpCode::Control(Control::Close), true, &[3, 232, 0xff])),
            ("new message inside a fragmented one", {
                let mut b = client_frame(OpCode::Data(Data::Binary), false, b"a");
                b.extend(binary(b"b"));
                b
            }),
        ];
        for (name, bytes) in cases {
            let (got, error, _) = read_all(bytes, 1 << 20).await;
            assert!(got.is_empty(), "{name}: {got:?}");
            assert!(matches!(error, Some(FrameError::Protocol(_))), "{name}: {error:?}");
        }
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error_and_between_messages_is_not() {
        let mut bytes = binary(b"whole");
        bytes.extend_from_slice(&binary(b"cut short")[..6]);
        let (got, error, _) = read_all(bytes, 1 << 20).await;
        assert_eq!(got, vec![Incoming::Binary(Bytes::from_static(b"whole"))]);
        assert!(matches!(error, Some(FrameError::Io(ref e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[tokio::test]
    async fn text_is_reported_without_being_assembled() {
        let bytes = client_frame(OpCode::Data(Data::Text), false, b"hel");
        let (got, _, _) = read_all(bytes, 1 << 20).await;
        assert_eq!(got, vec![Incoming::Text]);
    }

    /// Reads what the server wrote, as a client would (unmasked frames).
    fn server_frames(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut cursor = Cursor::new(bytes);
            let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.mask.is_none() && header.is_final);
            let start = cursor.position() as usize;
            out.push((header.opcode, bytes[start..start + len as usize].to_vec()));
            bytes = &bytes[start + len as usize..];
        }
        out
    }

    #[test]
    fn unmasking_xors_each_byte_with_the_mask_byte_of_its_position() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..=11 {
            let mut payload: Vec<u8> = (0..len as u8).collect();
            unmask(&mut payload, mask);
            let expected: Vec<u8> = (0..len).map(|i| i as u8 ^ mask[i % 4]).collect();
            assert_eq!(payload, expected, "{len} bytes");
        }
    }

    #[test]
    fn messages_read_on_one_thread_stay_intact_while_kept() {
        let first = message(b"first message");
        let second = message(b"second");
        let large = message(&[7u8; codec::REUSED_MAX + 1]);
        drop(second);
        let third = message(b"third, in the space the second had");
        assert_eq!(
            (&first[..], &third[..]),
            (&b"first message"[..], &b"third, in the space the second had"[..])
        );
        assert_eq!(large.len(), codec::REUSED_MAX + 1);
    }

    /// A socket that gathers slices (as a TCP stream does), taking at most `max` bytes a write.
    struct Gathering<S> {
        inner: S,
        max: usize,
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Gathering<S> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let max = self.max;
            Pin::new(&mut self.inner).poll_write(cx, &buf[..buf.len().min(max)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let gathered: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &gathered)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn writes_small_and_large_frames_through_a_slow_socket_and_keep_nothing() {
        let (server, client) = duplex(64);
        write_frames_and_read_them_back(server, client).await;
    }

    #[tokio::test]
    async fn writes_gathered_header_and_payload_even_when_the_socket_takes_part_of_the_header() {
        for max in [1, 3, 7, 4096] {
            let (server, client) = duplex(64);
            write_frames_and_read_them_back(Gathering { inner: server, max }, client).await;
        }
    }

    async fn write_frames_and_read_them_back<S: AsyncWrite + Unpin>(mut server: S, mut client: DuplexStream) {
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        let big = vec![9u8; 100_000];
        // One of each way a frame is written: copied and sent, gathered, kept and written on.
        let medium = vec![5u8; SMALL_WRITE + 1];
        let mut writer = FrameWriter::default();
        for frame in [
            Outgoing::Binary(b"reply"),
            Outgoing::Binary(&medium),
            Outgoing::Binary(&big),
            Outgoing::Ping,
            Outgoing::Pong(b"p"),
            Outgoing::Close(CloseCode::Away, "bye"),
        ] {
            let mut started = false;
            poll_fn(|cx| {
                if !started {
                    started = true;
                    writer.start(cx, &mut server, frame)
                } else {
                    writer.poll_finish(cx, &mut server)
                }
            })
            .await
            .unwrap();
            assert_eq!(writer.pending.capacity(), 0, "no buffer held between writes");
        }
        drop(server);
        let frames = server_frames(&reading.await.unwrap());
        let mut close = 1001u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        assert_eq!(
            frames,
            vec![
                (OpCode::Data(Data::Binary), b"reply".to_vec()),
                (OpCode::Data(Data::Binary), medium),
                (OpCode::Data(Data::Binary), big),
                (OpCode::Control(Control::Ping), vec![]),
                (OpCode::Control(Control::Pong), b"p".to_vec()),
                (OpCode::Control(Control::Close), close),
            ]
        );
    }

    #[test]
    fn the_handshake_checks_the_upgrade_headers_and_derives_the_accept_key() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        headers.insert(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap());
        // RFC 6455 §1.3's example.
        assert_eq!(accept(&headers).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        for missing in
            [header::CONNECTION, header::UPGRADE, header::SEC_WEBSOCKET_VERSION, header::SEC_WEBSOCKET_KEY]
        {
            let mut h = headers.clone();
            h.remove(&missing);
            assert_eq!(accept(&h).unwrap_err().0, http::StatusCode::BAD_REQUEST, "without {missing}");
        }
    }

    proptest::proptest! {
        /// The hand-written header is tungstenite's, for every length class and opcode we send.
        #[test]
        fn server_header_is_tungstenites(
            len in proptest::prop_oneof![0usize..=130, 0xFF00usize..=0x10100, proptest::prelude::any::<u32>().prop_map(|n| n as usize)],
            which in 0usize..4,
        ) {
            let opcode = [
                OpCode::Data(Data::Binary),
                OpCode::Control(Control::Ping),
                OpCode::Control(Control::Pong),
                OpCode::Control(Control::Close),
            ][which];
            let mut want = Vec::new();
            FrameHeader { opcode, ..FrameHeader::default() }.format(len as u64, &mut want).unwrap();
            let mut head = [0u8; 10];
            let n = server_header(opcode, len, &mut head);
            proptest::prop_assert_eq!(&head[..n], &want[..]);
        }

        /// Any bytes: an error or messages, never a panic, and never a buffer beyond what was read.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), chunk in 1usize..64) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (_, _, reader) = rt.block_on(read_all(bytes.clone(), chunk));
            proptest::prop_assert!(reader.buf.len() <= bytes.len());
        }

        /// Binary messages of any sizes, split anywhere, read back as sent.
        #[test]
        fn messages_split_anywhere_read_back(sizes in proptest::collection::vec(0usize..5000, 1..6), chunk in 1usize..3000) {
            let messages: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, n)| vec![i as u8; *n]).collect();
            let bytes: Vec<u8> = messages.iter().flat_map(|m| binary(m)).collect();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (got, error, reader) = rt.block_on(read_all(bytes, chunk));
            proptest::prop_assert!(error.is_none());
            let want: Vec<Incoming> = messages.into_iter().map(|m| Incoming::Binary(m.into())).collect();
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert_eq!(reader.buf.capacity(), 0);
        }
    }
}
