//! The floor of `tests/bench/probe`: a minimal OpAMP-over-WebSocket echo server, to measure what
//! a heartbeat costs the kernel and an event loop on this machine with nothing else on top.
//!
//! It does the framing our endpoint does for a heartbeat and no more: accepts the WebSocket
//! upgrade, reads masked binary frames (OpAMP's varint-0 header and an `AgentToServer`), and
//! answers each with a frame of the size of our heartbeat reply (a `ServerToAgent` carrying the
//! agent's instance uid and the server capabilities, 21 bytes, copied from the request's first
//! field rather than decoded: no protobuf, no state). One thread (tokio `current_thread`), one
//! task per connection, one read and one write per message like `serve`.
//!
//!     cargo build --release --example bench-echo
//!     target/release/examples/bench-echo --addr 127.0.0.1:4320 --admin-addr 127.0.0.1:4399
//!
//! `GET /admin/stats` (any path, on the admin address) answers `{"connected":N,"messages":M}`, the
//! two figures `tests/bench/probe` reads from every server.
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

static CONNECTED: AtomicU64 = AtomicU64::new(0);
static MESSAGES: AtomicU64 = AtomicU64::new(0);

/// The capabilities `serve` announces (AcceptsStatus, OffersRemoteConfig, AcceptsEffectiveConfig,
/// AcceptsPackagesStatus, OffersConnectionSettings), so the reply has the same size as ours.
const SERVER_CAPABILITIES: u8 = 0x37;

fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:4320".to_string();
    let mut admin = "127.0.0.1:4399".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--addr" => addr = value,
            "--admin-addr" => admin = value,
            other => panic!("unknown flag {other}; usage: bench-echo --addr A --admin-addr B"),
        }
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        let admin = TcpListener::bind(&admin).await?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = admin.accept().await {
                tokio::spawn(stats(stream));
            }
        });
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                if upgrade(&mut { stream }).await.is_err() {
                    // The connection is gone; nothing to report.
                }
            });
        }
    })
}

/// Answers one admin request with the counters, then closes.
async fn stats(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    let _ = stream.read(&mut buf).await;
    let body = format!(
        "{{\"connected\":{},\"messages\":{}}}",
        CONNECTED.load(Ordering::Relaxed),
        MESSAGES.load(Ordering::Relaxed)
    );
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

/// The upgrade, then frames until the peer closes.
async fn upgrade(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let key = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(resp.as_bytes()).await?;
    buf.drain(..end);
    CONNECTED.fetch_add(1, Ordering::Relaxed);
    let result = frames(stream, buf).await;
    CONNECTED.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Reads frames, answering each complete binary frame (and pings, and a close).
async fn frames(stream: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    loop {
        let mut at = 0;
        while let Some((opcode, start, end)) = frame(&mut buf[at..]) {
            let payload = &buf[at + start..at + end];
            match opcode {
                0x2 => {
                    MESSAGES.fetch_add(1, Ordering::Relaxed);
                    reply(&mut out, payload);
                }
                0x9 => server_frame(&mut out, 0xA, payload),
                0x8 => {
                    server_frame(&mut out, 0x8, &payload[..payload.len().min(2)]);
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                _ => {}
            }
            at += end;
        }
        buf.drain(..at);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// The opcode and payload bounds of the complete frame at the start of `buf`, unmasked in
/// place; `None` until all of it has arrived.
fn frame(buf: &mut [u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let mask: Option<[u8; 4]> = if masked {
        let m = buf.get(start..start + 4)?.try_into().ok()?;
        start += 4;
        Some(m)
    } else {
        None
    };
    let end = start.checked_add(len)?;
    if buf.len() < end {
        return None;
    }
    if let Some(mask) = mask {
        for (i, b) in buf[start..end].iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }
    Some((opcode, start, end))
}

/// Our heartbeat reply's frame: header 0, then `instance_uid` (field 1, 16 bytes, copied from
/// the request, whose first field it is) and `capabilities` (field 7).
fn reply(out: &mut Vec<u8>, payload: &[u8]) {
    let mut msg = [0u8; 21];
    msg[1] = 0x0a;
    msg[2] = 16;
    if payload.len() >= 19 && payload[1] == 0x0a && payload[2] == 16 {
        msg[3..19].copy_from_slice(&payload[3..19]);
    }
    msg[19] = 0x38;
    msg[20] = SERVER_CAPABILITIES;
    server_frame(out, 0x2, &msg);
}

/// An unmasked, final server frame (payloads under 126 bytes, all this server sends).
fn server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    out.push(payload.len().min(125) as u8);
    out.extend_from_slice(&payload[..payload.len().min(125)]);
}
