//! Span export over OTLP/HTTP (JSON encoding), when an endpoint is
//! configured: one server span per request, in the trace the client's
//! `traceparent` names (or a new one), with the span id the upstream
//! request carries as its parent. Spans are batched (up to 512, or every
//! second) and posted to `<endpoint>/v1/traces`; a full queue drops spans
//! and counts them rather than slowing requests down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// One finished request.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
    pub attributes: Vec<(&'static str, Value)>,
}

/// Hands spans to the export task.
#[derive(Clone)]
pub struct SpanExporter {
    tx: mpsc::Sender<Span>,
    pub dropped: Arc<AtomicU64>,
}

const QUEUE: usize = 8192;
const BATCH: usize = 512;

impl SpanExporter {
    /// Start exporting to `endpoint` (`http://host:port`) as `service`.
    pub fn start(
        endpoint: &str,
        service: String,
    ) -> Result<(SpanExporter, tokio::task::JoinHandle<()>), String> {
        let addr = endpoint
            .strip_prefix("http://")
            .ok_or_else(|| {
                format!("OTLP endpoint {endpoint:?}: only http://host:port is supported")
            })?
            .trim_end_matches('/');
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(export_loop(rx, addr, service));
        Ok((
            SpanExporter {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            task,
        ))
    }

    /// Queue a span; never waits.
    pub fn export(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn attr(key: &str, v: &Value) -> Value {
    let value = match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
        Value::Bool(b) => json!({"boolValue": b}),
        Value::String(s) => json!({"stringValue": s}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": value})
}

/// The OTLP/HTTP JSON body for a batch.
pub fn encode(service: &str, spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut v = json!({
                "traceId": s.trace_id,
                "spanId": s.span_id,
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attr(k, v)).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 0 }},
            });
            if let Some(p) = &s.parent_span_id {
                v["parentSpanId"] = json!(p);
            }
            v
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [attr("service.name", &json!(service))]},
            "scopeSpans": [{"scope": {"name": "sluice-waypoint"}, "spans": spans}],
        }]
    })
}

async fn export_loop(mut rx: mpsc::Receiver<Span>, addr: SocketAddr, service: String) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH { break }
                    }
                    None => {
                        if !batch.is_empty() {
                            let _ = post(addr, &encode(&service, &batch)).await;
                        }
                        return;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = post(addr, &encode(&service, &batch)).await {
            tracing::warn!(collector = %addr, error = %e, spans = batch.len(), "OTLP export failed; spans dropped");
        }
        batch.clear();
    }
}

async fn post(addr: SocketAddr, body: &Value) -> Result<(), String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post("/v1/traces")
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {}", resp.status()))
    }
}
