//! The HBONE server side: run HTTP/2 over an accepted mutual-TLS connection
//! and hand each well-formed CONNECT stream to the caller, who decides
//! (policy, target reachable) and then accepts or rejects it. Requests that
//! are not CONNECT get 400 as in ztunnel; so does a CONNECT whose
//! `:authority` is not an `ip:port`.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Stream, HboneSettings};

/// One CONNECT request waiting for a decision.
pub struct InboundStream {
    /// The original destination the client asked for.
    pub target: SocketAddr,
    pub request: Request<()>,
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl InboundStream {
    /// A request header as a string, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
    }

    /// Refuse the tunnel with `status` (e.g. 401 denied, 503 unreachable).
    pub fn reject(mut self, status: StatusCode) {
        let resp = Response::builder()
            .status(status)
            .body(())
            .expect("static response");
        let _ = self.respond.send_response(resp, true);
    }

    /// Open the tunnel (answer 200) and return the stream to splice.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let resp = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response");
        let send = self.respond.send_response(resp, false)?;
        Ok(H2Stream::new(send, self.body, None))
    }
}

/// Serve HTTP/2 on `io` (already TLS-terminated and authenticated) until
/// the client goes away; each CONNECT stream is passed to `on_stream` on a
/// task of its own.
pub async fn serve_connection<IO, F, Fut>(
    io: IO,
    settings: &HboneSettings,
    on_stream: F,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_connection_until(io, settings, std::future::pending(), on_stream).await
}

/// [`serve_connection`] that drains when `shutdown` completes: the client
/// gets a GOAWAY (so its pool opens new streams elsewhere), streams already
/// open run to their end, and then the connection closes.
pub async fn serve_connection_until<IO, F, Fut>(
    io: IO,
    settings: &HboneSettings,
    shutdown: impl Future<Output = ()>,
    on_stream: F,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    F: Fn(InboundStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.server_max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .handshake(io)
        .await?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut draining = false;
    loop {
        let next = if draining {
            conn.accept().await
        } else {
            tokio::select! {
                next = conn.accept() => next,
                _ = &mut shutdown => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
            }
        };
        let Some(next) = next else { break };
        let (request, mut respond) = next?;
        let bad = |respond: &mut SendResponse<Bytes>| {
            let resp = Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(())
                .expect("static response");
            let _ = respond.send_response(resp, true);
        };
        if request.method() != Method::CONNECT {
            tracing::debug!(method = %request.method(), "HBONE: not a CONNECT request");
            bad(&mut respond);
            continue;
        }
        let target = match request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        {
            Some(t) => t,
            None => {
                tracing::debug!(uri = %request.uri(), "HBONE: CONNECT authority is not ip:port");
                bad(&mut respond);
                continue;
            }
        };
        let (parts, body) = request.into_parts();
        let stream = InboundStream {
            target,
            request: Request::from_parts(parts, ()),
            respond,
            body,
        };
        tokio::spawn(on_stream(stream));
    }
    Ok(())
}
