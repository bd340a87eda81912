//! Admin (15000, localhost: `/config_dump`), Prometheus metrics (15020:
//! `/metrics`, `/stats/prometheus`), readiness (15021: `/healthz/ready`) and
//! liveness (15021: `/healthz/live`: the data path runs; unlike readiness it
//! does not depend on the CA or on every pod being enrolled, so an outage
//! of those never gets the agent — and every connection of the node —
//! restarted).
//! They run on a dedicated single-threaded runtime on their own OS thread,
//! so a slow scrape or a large dump never competes with the data path.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::{Ctx, EnrolledWorkload};

/// The running admin thread.
pub struct AdminServer(mesh_core::side_runtime::SideRuntime);

#[derive(Clone, Copy)]
enum Role {
    Admin,
    Metrics,
    Readiness,
}

impl AdminServer {
    /// Serve the three endpoints on already-bound listeners.
    pub fn start(
        ctx: Arc<Ctx>,
        admin: std::net::TcpListener,
        metrics: std::net::TcpListener,
        readiness: std::net::TcpListener,
    ) -> std::io::Result<Self> {
        let data = tokio::runtime::Handle::current();
        let side =
            mesh_core::side_runtime::SideRuntime::start("sluice-admin", move || async move {
                let mut tasks = tokio::task::JoinSet::new();
                for (l, role) in [
                    (admin, Role::Admin),
                    (metrics, Role::Metrics),
                    (readiness, Role::Readiness),
                ] {
                    let ctx = ctx.clone();
                    let data = data.clone();
                    tasks.spawn(async move {
                        if let Err(e) = serve(l, role, ctx, data).await {
                            tracing::error!(error = %e, "admin listener failed");
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            })?;
        Ok(Self(side))
    }

    pub fn stop(self) {
        self.0.stop();
    }
}

async fn serve(
    l: std::net::TcpListener,
    role: Role,
    ctx: Arc<Ctx>,
    data: tokio::runtime::Handle,
) -> std::io::Result<()> {
    l.set_nonblocking(true)?;
    let l = tokio::net::TcpListener::from_std(l)?;
    loop {
        let (tcp, _) = l.accept().await?;
        let ctx = ctx.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let ctx = ctx.clone();
                let data = data.clone();
                async move {
                    if req.method() == Method::GET && req.uri().path() == "/healthz/live" {
                        return Ok::<_, Infallible>(liveness(&data).await);
                    }
                    Ok(route(req, role, &ctx))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// How long the data-path runtime may take to run a task before the
/// agent is reported not alive.
const LIVENESS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Alive while the data-path runtime runs a trivial task promptly.
async fn liveness(data: &tokio::runtime::Handle) -> Response<Body> {
    match tokio::time::timeout(LIVENESS_WAIT, data.spawn(async {})).await {
        Ok(Ok(())) => respond(StatusCode::OK, "text/plain", "alive\n"),
        _ => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the data path does not run tasks\n",
        ),
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(http_body_util::BodyExt::boxed(Full::new(body.into())))
        .expect("static response parts")
}

/// Response bodies: whole, or streamed (the followed access log).
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `/access_log`: the kept records as JSON lines; with `follow=1`, new
/// records keep coming until the client disconnects.
fn access_log(req: &Request<Incoming>, ctx: &Ctx) -> Response<Body> {
    use http_body_util::BodyExt;
    let follow = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "follow=1" || p == "follow=true"));
    let mut text = String::new();
    for l in ctx.metrics.access_log.recent() {
        text.push_str(&l);
        text.push('\n');
    }
    if !follow {
        return respond(StatusCode::OK, "application/x-ndjson", text);
    }
    let rx = ctx.metrics.access_log.subscribe();
    let first = futures::stream::once(async move {
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(text)))
    });
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) => {
                    return Some((Ok(hyper::body::Frame::data(Bytes::from(line + "\n"))), rx))
                }
                // A slow reader skips what it missed rather than stalling the agent.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let body = http_body_util::StreamBody::new(futures::StreamExt::chain(first, rest)).boxed();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .expect("static response parts")
}

fn route(req: Request<Incoming>, role: Role, ctx: &Ctx) -> Response<Body> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let path = req.uri().path();
    match (role, path) {
        (Role::Admin, "/access_log") => access_log(&req, ctx),
        (Role::Admin, "/config_dump") => match serde_json::to_vec_pretty(&dump(ctx)) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        (Role::Admin, "/") => respond(
            StatusCode::OK,
            "text/plain",
            "endpoints: /config_dump /access_log[?follow=1] /healthz/ready /healthz/live\n",
        ),
        (Role::Metrics, "/metrics" | "/stats/prometheus") => {
            crate::telemetry::refresh_gauges(ctx);
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                mesh_core::metrics::encode(&ctx.registry),
            )
        }
        (_, "/healthz/ready") => {
            if ctx.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The `/config_dump` document: model, enrolled workloads, certificates
/// (public parts only) and pool state.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    pub node: String,
    pub ready: bool,
    pub enrolled: Vec<EnrolledWorkload>,
    pub certificates: Vec<mesh_core::identity::certs::CertSummary>,
    pub pool: mesh_core::hbone::PoolStats,
    /// eBPF capture state, when enabled.
    pub capture: Option<CaptureDump>,
    pub model: Arc<mesh_core::model::MeshModel>,
}

/// What the eBPF maps hold.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureDump {
    pub pin_dir: String,
    /// Network namespace cookies being captured.
    pub enrolled_namespaces: Vec<u64>,
    /// Original-destination records not yet claimed by the agent.
    pub tracked_connections: usize,
}

pub fn dump(ctx: &Ctx) -> ConfigDump {
    ConfigDump {
        node: ctx.cfg.node.clone(),
        ready: ctx.is_ready(),
        enrolled: ctx.enrolled(),
        certificates: ctx.certs.summaries(),
        pool: ctx.connector.stats(),
        capture: ctx.capture.as_ref().map(|c| CaptureDump {
            pin_dir: c.config().pin_dir.display().to_string(),
            enrolled_namespaces: c.enrolled_namespaces(),
            tracked_connections: c.tracked_connections(),
        }),
        model: ctx.model(),
    }
}
