//! Framing of OpAMP messages on both transports.
//!
//! WebSocket: each binary frame is a varint header (currently always `0`) followed by one
//! protobuf message. Old clients sent the message without the header; a protobuf message can
//! never start with a zero byte (field number 0 is invalid), so a first byte other than zero
//! means "no header".
//! HTTP: the body is the bare protobuf message, optionally gzip-compressed.
use std::io::Read;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::proto::{AgentToServer, ServerToAgent};

/// The only header value the specification defines.
pub const WS_HEADER: u8 = 0;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("malformed AgentToServer protobuf: {0}")]
    Protobuf(String),
    #[error("malformed gzip body: {0}")]
    Gzip(String),
    #[error("message exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
}

/// Decodes one WebSocket binary frame (with or without the header) into an `AgentToServer`.
pub fn decode_ws(frame: Bytes) -> Result<AgentToServer, DecodeError> {
    let mut msg = AgentToServer::default();
    decode_ws_into(frame, &mut msg)?;
    Ok(msg)
}

/// [`decode_ws`] into a message the caller holds, which must be empty (`Default`): the
/// endpoint's path, where returning the message (over 500 bytes) would copy it. After an
/// error the message holds whatever was decoded before it.
pub fn decode_ws_into(mut frame: Bytes, msg: &mut AgentToServer) -> Result<(), DecodeError> {
    match frame.first() {
        None => return Err(DecodeError::Empty),
        // A varint whose first byte is 0 is the single-byte value 0: the defined header.
        Some(&WS_HEADER) => frame.advance(1),
        Some(_) => {} // headerless frame from an older client
    }
    // The `instance_uid`, first when it comes as agents send it (fields in number order), is
    // a slice of the frame rather than a copy (the copy was one allocation per message, two
    // with the reference count prost's encoding of the reply then added). It does not pin the
    // frame's buffer for long: the registry keeps no wire uid (a `Uid` is 16 bytes copied), and
    // the bytes go into the reply, dropped once written. Merged after it, the rest of the
    // message decodes as the whole would: a later `instance_uid` replaces this one.
    if let Some(len) = leading_uid_len(&frame) {
        msg.instance_uid = frame.slice(2..2 + len);
        frame.advance(2 + len);
    }
    // From a slice, like `decode`: the kept `bytes` fields are copied out of the frame.
    msg.merge(frame.as_ref()).map_err(|e| DecodeError::Protobuf(e.to_string()))
}

/// The length of the message's first field when it is a whole `instance_uid` (field 1,
/// length-delimited) of under 128 bytes (a one-byte length).
fn leading_uid_len(message: &[u8]) -> Option<usize> {
    match *message {
        [0x0a, len, ..] if len < 0x80 && message.len() >= 2 + usize::from(len) => Some(usize::from(len)),
        _ => None,
    }
}

/// Decodes a bare protobuf `AgentToServer`.
///
/// Decoding from a slice copies `bytes` fields out of the frame: the registry keeps some of
/// them (effective config, hashes) for the agent's lifetime, and a zero-copy slice would pin
/// the whole receive buffer it came from.
pub fn decode(buf: impl AsRef<[u8]>) -> Result<AgentToServer, DecodeError> {
    AgentToServer::decode(buf.as_ref()).map_err(|e| DecodeError::Protobuf(e.to_string()))
}

/// Buffers up to this size are filled in the thread's reused buffer ([`split_off_reused`]);
/// larger ones (config pushes, large reports) in their own, so no thread keeps a large buffer.
pub const REUSED_MAX: usize = 16 * 1024;

/// A thread's buffer that [`split_off_reused`] fills and splits buffers off.
pub type Reused = std::thread::LocalKey<std::cell::RefCell<BytesMut>>;

thread_local! {
    /// Where [`encode_ws`] encodes on this thread.
    static WS_FRAMES: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// `len` bytes written by `fill`, split off `reused` (this thread's buffer) when small: a buffer
/// is usually dropped (written, or handled) before the next one is made on the same thread (one
/// event loop per thread), and the next then reuses the same allocation, so small buffers cost
/// no allocation.
pub fn split_off_reused(reused: &'static Reused, len: usize, fill: impl FnOnce(&mut BytesMut)) -> Bytes {
    let split = |buf: &mut BytesMut| {
        buf.reserve(len); // reclaims the allocation when every buffer split off it is gone
        fill(buf);
        buf.split().freeze()
    };
    if len > REUSED_MAX {
        return split(&mut BytesMut::new());
    }
    reused.with_borrow_mut(split)
}

/// Encodes a `ServerToAgent` as one WebSocket binary frame payload (header + message), in the
/// thread's reused buffer ([`split_off_reused`]).
pub fn encode_ws(msg: &ServerToAgent) -> Bytes {
    split_off_reused(&WS_FRAMES, 1 + msg.encoded_len(), |buf| {
        buf.put_u8(WS_HEADER);
        // `encode` would compute the length again to check the room left: a BytesMut grows.
        msg.encode_raw(buf);
    })
}

/// A WebSocket frame's payload (header + message) as [`encode_ws_reply`] makes it: inline for
/// the plain reply, else in the thread's reused buffer ([`encode_ws`]).
pub enum WsFrame {
    Inline { bytes: [u8; PLAIN_FRAME_MAX], len: u8 },
    Encoded(Bytes),
}

impl std::ops::Deref for WsFrame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WsFrame::Inline { bytes, len } => &bytes[..usize::from(*len)],
            WsFrame::Encoded(bytes) => bytes,
        }
    }
}

/// The longest `instance_uid` [`encode_ws_reply`] encodes inline (a uid is 16 bytes; a
/// 26-character ULID from older agents fits too).
const PLAIN_UID_MAX: usize = 32;
/// Header, the uid's tag, length and bytes, then `flags` and `capabilities` (tag and a varint
/// of up to 10 bytes each).
const PLAIN_FRAME_MAX: usize = 1 + 2 + PLAIN_UID_MAX + 2 * 11;

/// [`encode_ws`], with the reply to most messages (a heartbeat's: `instance_uid`,
/// `capabilities` and maybe `flags`, nothing else) written by hand into the frame itself.
///
/// Hand-written because it is the hot path: prost's `encoded_len` and `encode_raw` each visit
/// the eleven fields of `ServerToAgent`, and the frame then goes through the reused buffer
/// (reserve, split, freeze, drop), several hundred instructions for some twenty bytes. The
/// bytes are prost's exactly (fields in number order, zero values left out, varints), which a
/// property test checks against prost's own encoding; any other reply is prost's.
pub fn encode_ws_reply(msg: &ServerToAgent) -> WsFrame {
    // Every field named, so that a field added to the schema is not left out silently.
    let ServerToAgent {
        instance_uid,
        error_response: None,
        remote_config: None,
        connection_settings: None,
        packages_available: None,
        flags,
        capabilities,
        agent_identification: None,
        command: None,
        custom_capabilities: None,
        custom_message: None,
    } = msg
    else {
        return WsFrame::Encoded(encode_ws(msg));
    };
    if instance_uid.len() > PLAIN_UID_MAX {
        return WsFrame::Encoded(encode_ws(msg));
    }
    let mut bytes = [0u8; PLAIN_FRAME_MAX];
    bytes[0] = WS_HEADER;
    let mut len = 1;
    if !instance_uid.is_empty() {
        bytes[1] = 1 << 3 | 2; // field 1, length-delimited
        bytes[2] = instance_uid.len() as u8; // under 128: a one-byte varint
        bytes[3..3 + instance_uid.len()].copy_from_slice(instance_uid);
        len = 3 + instance_uid.len();
    }
    for (field, value) in [(6u8, *flags), (7, *capabilities)] {
        if value != 0 {
            bytes[len] = field << 3; // varint
            len = put_varint(&mut bytes, len + 1, value);
        }
    }
    WsFrame::Inline { bytes, len: len as u8 }
}

/// Writes `value` as a protobuf varint at `at`; returns the offset after it.
fn put_varint(bytes: &mut [u8; PLAIN_FRAME_MAX], mut at: usize, mut value: u64) -> usize {
    while value >= 0x80 {
        bytes[at] = value as u8 | 0x80;
        value >>= 7;
        at += 1;
    }
    bytes[at] = value as u8;
    at + 1
}

/// Encodes a `ServerToAgent` as an HTTP body.
pub fn encode(msg: &ServerToAgent) -> Bytes {
    Bytes::from(msg.encode_to_vec())
}

/// Inflates a gzip body, refusing to produce more than `limit` bytes (no gzip bombs).
pub fn gunzip(body: &[u8], limit: usize) -> Result<Bytes, DecodeError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let mut reader = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
    reader.read_to_end(&mut out).map_err(|e| DecodeError::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out.into())
}

/// Gzips a body.
pub fn gzip(body: &[u8]) -> Bytes {
    use std::io::Write;
    let mut enc =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 2 + 32), flate2::Compression::fast());
    enc.write_all(body).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentToServer {
        AgentToServer {
            instance_uid: Bytes::from_static(&[7; 16]),
            sequence_num: 3,
            capabilities: 1,
            ..Default::default()
        }
    }

    #[test]
    fn ws_frame_with_header_roundtrips() {
        let msg = sample();
        let mut frame = vec![0u8];
        msg.encode(&mut frame).unwrap();
        assert_eq!(decode_ws(frame.into()).unwrap(), msg);
    }

    #[test]
    fn ws_frame_without_header_from_old_clients_is_accepted() {
        let msg = sample();
        assert_eq!(decode_ws(msg.encode_to_vec().into()).unwrap(), msg);
    }

    #[test]
    fn empty_frame_is_refused_and_a_bare_header_is_an_empty_message() {
        assert_eq!(decode_ws(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(decode_ws(Bytes::from_static(&[0])).unwrap(), AgentToServer::default());
    }

    #[test]
    fn garbage_and_truncated_protobuf_are_refused() {
        assert!(matches!(
            decode_ws(Bytes::from_static(&[0, 0xff, 0xff, 0xff])),
            Err(DecodeError::Protobuf(_))
        ));
        let full = sample().encode_to_vec();
        let truncated = Bytes::copy_from_slice(&full[..full.len() - 3]);
        assert!(matches!(decode(truncated), Err(DecodeError::Protobuf(_))));
    }

    #[test]
    fn frames_encoded_on_one_thread_stay_intact_while_kept() {
        let big = ServerToAgent { instance_uid: Bytes::from(vec![9; REUSED_MAX]), ..Default::default() };
        let msgs: Vec<ServerToAgent> = (0..100u64)
            .map(|i| ServerToAgent {
                capabilities: i,
                instance_uid: Bytes::from(vec![i as u8; 16]),
                ..Default::default()
            })
            .chain([big])
            .collect();
        // Kept (not dropped as the WebSocket path does): each frame still decodes to its message.
        let frames: Vec<Bytes> = msgs.iter().map(encode_ws).collect();
        for (frame, msg) in frames.iter().zip(&msgs) {
            assert_eq!(frame[0], WS_HEADER);
            assert_eq!(&ServerToAgent::decode(&frame[1..]).unwrap(), msg);
        }
        // Dropped one by one, as written frames are: the same holds.
        for msg in &msgs {
            let frame = encode_ws(msg);
            assert_eq!(&ServerToAgent::decode(&frame[1..]).unwrap(), msg);
        }
    }

    #[test]
    fn encode_ws_prefixes_the_zero_header() {
        let msg = ServerToAgent { capabilities: 7, ..Default::default() };
        let frame = encode_ws(&msg);
        assert_eq!(frame[0], 0);
        assert_eq!(ServerToAgent::decode(&frame[1..]).unwrap(), msg);
    }

    /// A reply with any of `ServerToAgent`'s other fields, to check `encode_ws_reply` leaves it
    /// to prost.
    fn with_other_field(msg: &mut ServerToAgent, which: u8) {
        use crate::proto::*;
        match which {
            0 => msg.error_response = Some(ServerErrorResponse::default()),
            1 => msg.remote_config = Some(AgentRemoteConfig::default()),
            2 => msg.connection_settings = Some(Box::default()),
            3 => msg.packages_available = Some(Box::default()),
            4 => msg.agent_identification = Some(AgentIdentification::default()),
            5 => msg.command = Some(Box::default()),
            6 => msg.custom_capabilities = Some(CustomCapabilities::default()),
            7 => msg.custom_message = Some(CustomMessage::default()),
            _ => {}
        }
    }

    proptest::proptest! {
        /// The hand-written plain reply is prost's encoding byte for byte, and any other reply
        /// is prost's own.
        #[test]
        fn ws_reply_is_prosts_encoding(
            uid in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
            flags in proptest::prelude::any::<u64>(),
            capabilities in proptest::prelude::any::<u64>(),
            zeros in 0u8..4,
            other in 0u8..12,
        ) {
            let mut msg = ServerToAgent {
                instance_uid: uid.into(),
                // Zero values too, which the encoding leaves out.
                flags: if zeros & 1 != 0 { 0 } else { flags },
                capabilities: if zeros & 2 != 0 { 0 } else { capabilities },
                ..Default::default()
            };
            with_other_field(&mut msg, other);
            let mut want = vec![WS_HEADER];
            msg.encode(&mut want).unwrap();
            let frame = encode_ws_reply(&msg);
            proptest::prop_assert_eq!(&frame[..], &want[..]);
            let inline = matches!(frame, WsFrame::Inline { .. });
            proptest::prop_assert_eq!(inline, other >= 8 && msg.instance_uid.len() <= PLAIN_UID_MAX);
        }
    }

    proptest::proptest! {
        /// A frame that starts with an `instance_uid`, then any bytes (other fields, another
        /// `instance_uid`, garbage): decoded as prost decodes it, or refused when prost refuses.
        #[test]
        fn ws_frame_decodes_as_prost_decodes(
            uid in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..140),
            declared in proptest::option::of(0u8..0x90),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            later_uid in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)),
            sequence_num in proptest::prelude::any::<u64>(),
        ) {
            let mut message = vec![0x0a];
            // The uid's true length, or another (too long, or shorter: the rest then misparses).
            prost::encoding::encode_varint(declared.map_or(uid.len() as u64, u64::from), &mut message);
            message.extend_from_slice(&uid);
            let tail = AgentToServer {
                instance_uid: later_uid.unwrap_or_default().into(),
                sequence_num,
                ..Default::default()
            };
            tail.encode(&mut message).unwrap();
            for tail in [&[][..], &rest[..]] {
                let mut whole = message.clone();
                whole.extend_from_slice(tail);
                let want = AgentToServer::decode(&whole[..]).ok();
                let mut framed = vec![WS_HEADER];
                framed.extend_from_slice(&whole);
                proptest::prop_assert_eq!(decode_ws(framed.into()).ok(), want.clone());
                proptest::prop_assert_eq!(decode_ws(whole.into()).ok(), want);
            }
        }
    }

    #[test]
    fn gzip_roundtrips_and_bombs_are_refused() {
        let body = sample().encode_to_vec();
        assert_eq!(&gunzip(&gzip(&body), 1024).unwrap()[..], &body[..]);
        let bomb = gzip(&vec![b'a'; 1 << 20]);
        assert_eq!(gunzip(&bomb, 1000), Err(DecodeError::TooLarge { limit: 1000 }));
        assert!(matches!(gunzip(b"not gzip", 1000), Err(DecodeError::Gzip(_))));
    }
}
