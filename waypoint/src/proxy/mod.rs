//! The life of one HTTP request through the waypoint, as named phases,
//! each its own module with its own unit tests:
//!
//! 1. [`route`] — find the rule (404 when routes exist and none matches);
//! 2. [`authorize`] — `CUSTOM` policies ask their external authorizer,
//!    then L7 AuthorizationPolicy (403);
//! 3. [`rate_limit`] — the rule's token bucket (429 + `retry-after`);
//! 4. [`fault`] — injected delay and abort;
//! 5. [`rewrite`] — answer a redirect, or edit path, host and headers;
//!    propagate W3C trace context;
//! 6. [`mirror`] — a copy to the shadow backend, answer discarded;
//! 7. [`forward`] — weighted backend, per-try and overall timeouts,
//!    retries with backoff inside a retry budget;
//! 8. [`respond`] — response header edits; metrics, access log and span
//!    when the response body ends.
//!
//! Why plain functions and not tower layers or a phase trait: each phase
//! needs what an earlier one found (the routed rule, the authorizers'
//! headers, the buffered body), so as layers those would travel as
//! untyped request extensions, and a trait would force one signature on
//! phases that differ (some are synchronous, some take the body, one
//! returns the response). Here a phase is a function from what it needs
//! to `Result<_, Local>`: `Err` is a local answer ([`answer::Local`]) that
//! ends the request, so `process` reads top to bottom with `?`, like
//! pingora's request phases. The I/O a phase does goes through a trait
//! ([`crate::backend::Backends`], [`crate::extauthz::Authorizer`]), so the
//! tests drive each phase against a fake upstream.

pub mod answer;
pub mod authorize;
pub mod fault;
pub mod forward;
pub mod mirror;
pub mod rate_limit;
pub mod respond;
pub mod rewrite;
pub mod route;
#[cfg(test)]
mod testing;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::identity::SpiffeId;
use mesh_core::model::MeshModel;

pub use self::answer::ResponseFlag;
use self::answer::{Local, Record};
use self::authorize::Authorize;
use self::fault::Injected;
use self::forward::{Forward, Payload};
use self::mirror::Mirror;
use crate::extauthz;
use crate::Ctx;

/// Response bodies the waypoint returns.
pub type RespBody = crate::backend::RespBody;

/// What the waypoint knows about the tunnel a request came in on.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    /// Verified by mTLS: the client's identity (its node agent presents
    /// the source pod's certificate).
    pub source_identity: SpiffeId,
    pub source_ip: IpAddr,
    /// The original destination (service VIP and port).
    pub target: SocketAddr,
    pub service_namespace: String,
    pub service_name: String,
    pub port: u16,
}

/// Serve one request; never fails (errors become status codes).
pub async fn handle(
    ctx: Arc<Ctx>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let in_flight = ctx.retry_budget.request();
    let model = ctx.model();
    let mut rec = Record::new(&req);
    let resp = match process(&ctx, &conn, &model, req, &mut rec).await {
        Ok(resp) => resp,
        Err(local) => local.answer(&mut rec),
    };
    drop(in_flight);
    Ok(respond::finish(ctx, conn, model, resp, rec))
}

/// The phases, in order; an `Err` is the local answer that ends it.
async fn process(
    ctx: &Ctx,
    conn: &ConnCtx,
    model: &Arc<MeshModel>,
    req: Request<Incoming>,
    rec: &mut Record,
) -> Result<Response<RespBody>, Local> {
    let svc = model
        .service(&conn.service_namespace, &conn.service_name)
        .ok_or_else(route::service_gone)?;

    // 1. route — GAMMA: consumer routes apply to callers of their own
    // namespace.
    let table = ctx
        .routes(model, svc, conn.port, conn.source_identity.namespace())
        .map_err(route::misconfigured)?;
    let routed = route::select(&table, &req)?;
    let rule = routed.rule;
    rec.route = rule.id.clone();

    // 2. authorize
    let from_authorizers = Authorize {
        model,
        waypoint: (&ctx.cfg.namespace, &ctx.cfg.name),
        authorizer: &extauthz::Client {
            backends: &*ctx.backends,
            model,
            waypoint: &ctx.identity,
        },
        metrics: &ctx.metrics,
    }
    .check(conn, &rec.host, &req)
    .await?;

    // 3. rate_limit
    rate_limit::check(&ctx.limiter, rule, &conn.source_identity, Instant::now())?;

    // 4. fault
    if fault::inject(rule.fault.as_ref(), fault::chance).await? == Injected::Delayed {
        rec.flags = ResponseFlag::DelayInjected;
    }

    // 5. redirect / rewrite
    if let Some(redirect) =
        rewrite::redirect(rule, routed.matched_prefix, &rec.host, conn.port, req.uri())
    {
        return Err(redirect);
    }
    let (mut parts, body) = req.into_parts();
    rec.trace = Some(rewrite::rewrite(
        &mut parts,
        rule,
        routed.matched_prefix,
        &from_authorizers,
    ));
    let replay = rule.retry.is_some() || !rule.mirrors.is_empty();
    let payload = Payload::read(body, replay).await?;

    // 6. mirror
    if let Payload::Buffered(body) = &payload {
        rec.request_bytes = body.len() as u64;
        let mirror = Mirror {
            backends: &ctx.backends,
            model,
            source_ip: conn.source_ip,
            host: &rec.host,
        };
        mirror.spawn(&rule.mirrors, &parts, body, fault::chance);
    }

    // 7. forward
    let forward = Forward {
        backends: &*ctx.backends,
        model,
        source_ip: conn.source_ip,
        budget: &ctx.retry_budget,
    };
    let resp = forward.send(rule, parts, payload, rec).await?;

    // 8. respond (telemetry follows in `handle`)
    Ok(respond::edit(rule, resp))
}
