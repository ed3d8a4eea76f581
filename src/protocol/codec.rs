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
    // From a slice, like `decode`: the kept `bytes` fields are copied out of the frame.
    msg.merge(frame.as_ref()).map_err(|e| DecodeError::Protobuf(e.to_string()))
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

    #[test]
    fn gzip_roundtrips_and_bombs_are_refused() {
        let body = sample().encode_to_vec();
        assert_eq!(&gunzip(&gzip(&body), 1024).unwrap()[..], &body[..]);
        let bomb = gzip(&vec![b'a'; 1 << 20]);
        assert_eq!(gunzip(&bomb, 1000), Err(DecodeError::TooLarge { limit: 1000 }));
        assert!(matches!(gunzip(b"not gzip", 1000), Err(DecodeError::Gzip(_))));
    }
}
