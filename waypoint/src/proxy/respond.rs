//! Phase 8, `respond`: the rule's response header edits, and the request's
//! telemetry — Istio's request metrics (reporter `waypoint`), the access
//! log line and the trace span — written when the response body has been
//! sent, or abandoned by the client ([`Tracked`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use mesh_core::metrics::{Peer, Reporter, RequestLabels, TcpLabels};
use mesh_core::model::MeshModel;

use crate::backend::RespBody;
use crate::proxy::answer::Record;
use crate::proxy::ConnCtx;
use crate::routes::{modify_headers, Rule};
use crate::Ctx;

/// Apply the rule's response header modifier.
pub fn edit(rule: &Rule, mut resp: Response<RespBody>) -> Response<RespBody> {
    if let Some(m) = &rule.response_headers {
        modify_headers(m, resp.headers_mut());
    }
    resp
}

/// What a response body's end tells telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Body bytes sent.
    pub bytes: u64,
    /// gRPC status from the headers or, later, the trailers.
    pub grpc_status: Option<String>,
}

/// Called once when a response body ends or is dropped.
type OnEnd = Box<dyn FnOnce(Ended) + Send + Sync>;

/// A response body that counts what it sends and says when it is done.
pub struct Tracked {
    inner: RespBody,
    ended: Ended,
    on_end: Option<OnEnd>,
}

impl Tracked {
    /// Track `resp`'s body; `on_end` runs once, at its end.
    pub fn wrap(
        resp: Response<RespBody>,
        on_end: impl FnOnce(u16, Ended) + Send + Sync + 'static,
    ) -> Response<RespBody> {
        let grpc_status = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = resp.status().as_u16();
        let (parts, inner) = resp.into_parts();
        let tracked = Tracked {
            inner,
            ended: Ended {
                bytes: 0,
                grpc_status,
            },
            on_end: Some(Box::new(move |e| on_end(status, e))),
        };
        Response::from_parts(parts, tracked.boxed())
    }

    fn end(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.ended.clone());
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.end();
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.ended.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        self.ended.grpc_status = Some(s.to_string());
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wrap the response so metrics, the access log and the span are written
/// when its body has been sent (or abandoned).
pub fn finish(
    ctx: Arc<Ctx>,
    conn: Arc<ConnCtx>,
    model: Arc<MeshModel>,
    resp: Response<RespBody>,
    rec: Record,
) -> Response<RespBody> {
    Tracked::wrap(resp, move |status, ended| {
        record(&ctx, &conn, &model, &rec, status, &ended)
    })
}

fn record(ctx: &Ctx, conn: &ConnCtx, model: &MeshModel, rec: &Record, status: u16, e: &Ended) {
    let src = model
        .workload_by_ip(conn.source_ip)
        .filter(|w| model.identity(w) == conn.source_identity);
    let dst = rec
        .destination_workload
        .and_then(|i| model.workloads.get(i));
    let dst_id = dst.map(|w| model.identity(w));
    let svc = model.service(&conn.service_namespace, &conn.service_name);
    let mut peers = TcpLabels::new(
        model,
        Reporter::Waypoint,
        Peer {
            workload: src,
            identity: Some(&conn.source_identity),
        },
        Peer {
            workload: dst,
            identity: dst_id.as_ref(),
        },
        svc,
        true,
    );
    peers.request_protocol = if rec.grpc { "grpc" } else { "http" };
    peers.response_flags = rec.flags.as_str();
    let labels = RequestLabels {
        peers,
        response_code: status,
        grpc_response_status: e.grpc_status.clone().unwrap_or_default(),
    };
    export_span(ctx, conn, rec, status, e.bytes);
    let elapsed = rec.start.elapsed();
    let m = &ctx.metrics.requests;
    m.requests.get_or_create(&labels).inc();
    m.duration_ms
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64() * 1000.0);
    m.request_bytes
        .get_or_create(&labels)
        .observe(rec.request_bytes as f64);
    m.response_bytes
        .get_or_create(&labels)
        .observe(e.bytes as f64);
    tracing::info!(
        target: "access",
        method = %rec.method,
        path = %rec.path,
        host = %rec.host,
        status,
        flags = rec.flags.as_str(),
        route = %rec.route,
        src = %conn.source_ip,
        src.identity = %conn.source_identity,
        service = %format!("{}/{}", conn.service_namespace, conn.service_name),
        upstream = %rec.upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        attempts = rec.attempts,
        duration_ms = elapsed.as_millis() as u64,
        bytes_sent = e.bytes,
        trace_id = %rec.trace.as_ref().map_or("-", |t| t.trace.as_str()),
        grpc_status = %e.grpc_status.as_deref().unwrap_or("-"),
        reason = %rec.reason,
        "request"
    );
}

fn export_span(ctx: &Ctx, conn: &ConnCtx, rec: &Record, status: u16, bytes: u64) {
    let (Some(spans), Some(t)) = (&ctx.spans, &rec.trace) else {
        return;
    };
    spans.export(crate::otlp::Span {
        trace_id: t.trace.clone(),
        span_id: t.span.clone(),
        parent_span_id: t.parent.clone(),
        name: format!(
            "{}.{}.svc.cluster.local:{}/*",
            conn.service_name, conn.service_namespace, conn.port
        ),
        start: rec.wall_start,
        end: std::time::SystemTime::now(),
        error: status >= 500,
        attributes: vec![
            ("http.request.method", rec.method.as_str().into()),
            ("url.path", rec.path.clone().into()),
            ("server.address", rec.host.clone().into()),
            ("http.response.status_code", status.into()),
            ("http.response.body.size", bytes.into()),
            (
                "istio.source_principal",
                conn.source_identity.to_string().into(),
            ),
            (
                "upstream.address",
                rec.upstream
                    .map(|a| a.to_string())
                    .unwrap_or_default()
                    .into(),
            ),
            ("route", rec.route.clone().into()),
            ("response_flags", rec.flags.as_str().into()),
        ],
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::answer::full;
    use crate::proxy::testing;
    use http::{HeaderMap, HeaderValue};
    use http_body_util::{Full, StreamBody};
    use mesh_core::model::gateway::{HeaderModifier, HttpHeader};
    use std::sync::Mutex;

    type Ends = Arc<Mutex<Vec<(u16, Ended)>>>;

    fn tracked(resp: Response<RespBody>) -> (Response<RespBody>, Ends) {
        let ends = Arc::new(Mutex::new(vec![]));
        let sink = ends.clone();
        let r = Tracked::wrap(resp, move |s, e| sink.lock().unwrap().push((s, e)));
        (r, ends)
    }

    #[tokio::test]
    async fn the_end_of_the_body_is_reported_once_with_its_size() {
        let (r, ends) = tracked(Response::new(full("hello world")));
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(
            ends.lock().unwrap().as_slice(),
            [(
                200,
                Ended {
                    bytes: 11,
                    grpc_status: None
                }
            )]
        );
    }

    #[tokio::test]
    async fn grpc_status_comes_from_the_trailers_and_abandoned_bodies_still_report() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("7"));
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames)).boxed();
        let (r, ends) = tracked(Response::new(body));
        drop(r.into_body().collect().await.unwrap());
        assert_eq!(ends.lock().unwrap()[0].1.grpc_status.as_deref(), Some("7"));

        // The client went away before reading: reported at drop.
        let (r, ends) = tracked(Response::new(
            Full::new(Bytes::from_static(b"x"))
                .map_err(|never| match never {})
                .boxed(),
        ));
        drop(r);
        assert_eq!(ends.lock().unwrap()[0].1.bytes, 0);
    }

    #[test]
    fn response_headers_are_edited_per_rule() {
        let mut rule = testing::rule();
        rule.response_headers = Some(HeaderModifier {
            set: vec![HttpHeader {
                name: "x-served-by".into(),
                value: "waypoint".into(),
            }],
            remove: vec!["server".into()],
            ..Default::default()
        });
        let mut resp = Response::new(full(""));
        resp.headers_mut()
            .insert("server", HeaderValue::from_static("app"));
        let resp = edit(&rule, resp);
        assert_eq!(resp.headers()["x-served-by"], "waypoint");
        assert!(!resp.headers().contains_key("server"));
    }
}
