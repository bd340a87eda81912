//! The waypoint's admin endpoint: Prometheus metrics (`/stats/prometheus`,
//! `/metrics`), readiness (`/healthz/ready`: 200 once its certificate is
//! issued) and `/config_dump` (identity, served services, ejected
//! endpoints). Plain HTTP/1.1; bind it to a local or pod-internal address.
//! It runs on a runtime of its own ([`mesh_core::side_runtime`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Ctx;

/// Serve on `listener` (bound, non-blocking) on the current runtime.
pub async fn serve(listener: std::net::TcpListener, ctx: Arc<Ctx>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener failed");
            return;
        }
    };
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&ctx, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn answer(ctx: &Ctx, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response")
    };
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            mesh_core::metrics::encode(&ctx.registry),
        ),
        "/healthz/ready" => {
            if ctx.is_shutting_down() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else if ctx.certs.current(&ctx.identity).is_some() {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "waiting for certificate\n".into(),
                )
            }
        }
        "/config_dump" => {
            let model = ctx.model();
            let services: Vec<String> = model
                .services
                .iter()
                .filter(|s| {
                    model
                        .service_waypoint(s)
                        .flatten()
                        .is_some_and(|g| ctx.is_me(g))
                })
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect();
            let dump = serde_json::json!({
                "waypoint": format!("{}/{}", ctx.cfg.namespace, ctx.cfg.name),
                "identity": ctx.identity.to_string(),
                "services": services,
                "httpRoutes": model.http_routes,
                "destinationRules": model.destination_rules,
                "ejectedEndpoints": ctx.backends.balancer.ejected(),
            });
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
