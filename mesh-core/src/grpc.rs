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

/// Frame one message as a unary gRPC body (uncompressed).
pub fn frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

/// Decode the one message of a unary gRPC body.
pub fn unframe<M: Message + Default>(body: &[u8]) -> Result<M, String> {
    if body.len() < 5 {
        return Err("truncated gRPC message (shorter than its 5-byte prefix)".into());
    }
    if body[0] != 0 {
        return Err("compressed gRPC messages are not supported".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(format!(
            "gRPC message of {len} bytes exceeds the limit of {MAX_MESSAGE}"
        ));
    }
    let msg = body.get(5..5 + len).ok_or("truncated gRPC message")?;
    M::decode(msg).map_err(|e| format!("bad protobuf: {e}"))
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
        assert!(unframe::<Probe>(b"\0\0").unwrap_err().contains("truncated"));
        assert!(unframe::<Probe>(b"\x01\0\0\0\0")
            .unwrap_err()
            .contains("compressed"));
        assert!(unframe::<Probe>(b"\0\xff\xff\xff\xff")
            .unwrap_err()
            .contains("exceeds"));
        assert!(unframe::<Probe>(b"\0\0\0\0\x09abc")
            .unwrap_err()
            .contains("truncated"));
    }
}
