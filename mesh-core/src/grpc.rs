//! The few pieces of gRPC that Sluice speaks without a gRPC framework: the
//! length-prefixed message framing of unary calls and the status codes it
//! answers with. Used by the waypoint's `ext_authz` client and by the
//! certificate service (Istio's `IstioCertificateService`, server and
//! client).

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// Largest unary message accepted (a CSR or a certificate chain is a few KiB).
pub const MAX_MESSAGE: usize = 1 << 20;

/// gRPC status codes used here (the numbers are the protocol's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// A gRPC error: the status code a call ends with and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gRPC status {code:?}: {message}")]
pub struct Status {
    pub code: Code,
    pub message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// Why a unary gRPC body could not be read as one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated gRPC message (shorter than its 5-byte prefix)")]
    NoPrefix,
    #[error("compressed gRPC messages are not supported")]
    Compressed,
    #[error("gRPC message of {0} bytes exceeds the limit of {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("truncated gRPC message ({declared} bytes declared, {present} present)")]
    Truncated { declared: usize, present: usize },
    #[error("bad protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// A non-OK `grpc-status` in response headers or trailers, as the peer
/// sent it (the code number and its percent-decoded `grpc-message`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gRPC status {code}: {message}")]
pub struct PeerStatus {
    pub code: String,
    pub message: String,
}

/// The status `headers` carry: `Ok` when none or `0`.
pub fn peer_status(headers: &http::HeaderMap) -> Result<(), PeerStatus> {
    let Some(status) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code = status.to_str().unwrap_or("?");
    if code == "0" {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Err(PeerStatus {
        code: code.to_string(),
        message,
    })
}

/// `grpc-message` is percent-encoded outside printable ASCII.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`percent_encode`] (invalid escapes stay as they are).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Frame one message as a unary gRPC body (uncompressed).
pub fn frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

/// Decode the one message of a unary gRPC body.
pub fn unframe<M: Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    if body.len() < 5 {
        return Err(FrameError::NoPrefix);
    }
    if body[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    let msg = body.get(5..5 + len).ok_or(FrameError::Truncated {
        declared: len,
        present: body.len() - 5,
    })?;
    Ok(M::decode(msg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Probe {
        #[prost(string, tag = "1")]
        text: String,
    }

    #[test]
    fn frames_round_trip_and_garbage_is_named() {
        let m = Probe {
            text: "hello".into(),
        };
        assert_eq!(unframe::<Probe>(&frame(&m)).unwrap(), m);
        let e = |b: &[u8]| unframe::<Probe>(b).unwrap_err();
        assert_eq!(e(b"\0\0"), FrameError::NoPrefix);
        assert_eq!(e(b"\x01\0\0\0\0"), FrameError::Compressed);
        assert_eq!(
            e(b"\0\xff\xff\xff\xff"),
            FrameError::TooLarge(u32::MAX as usize)
        );
        assert_eq!(
            e(b"\0\0\0\0\x09abc"),
            FrameError::Truncated {
                declared: 9,
                present: 3
            }
        );
        assert!(matches!(e(b"\0\0\0\0\x02\x0a\x05"), FrameError::Decode(_)));
        assert!(e(b"\x01\0\0\0\0").to_string().contains("compressed"));
    }

    #[test]
    fn grpc_messages_survive_percent_encoding() {
        let m = "node \"b\" — 100% sure\n";
        assert_eq!(percent_decode(&percent_encode(m)), m);
        assert!(percent_encode(m).is_ascii());
    }

    #[test]
    fn peer_statuses_are_read_and_decoded() {
        let mut h = http::HeaderMap::new();
        assert_eq!(peer_status(&h), Ok(()));
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(peer_status(&h), Ok(()));
        h.insert("grpc-status", "7".parse().unwrap());
        h.insert(
            "grpc-message",
            percent_encode("not yours: caf\u{e9}").parse().unwrap(),
        );
        let s = peer_status(&h).unwrap_err();
        assert_eq!(
            (s.code.as_str(), s.message.as_str()),
            ("7", "not yours: caf\u{e9}")
        );
    }
}
