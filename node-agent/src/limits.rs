//! The agent's accept loop: every accepted connection takes a connection
//! slot of the agent's [`Limiter`] or is reset at once (counted, logged at
//! most once a second); a drain refuses what arrives after it began.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

pub use mesh_core::limits::{ConnectionLimits, Limiter};

use crate::Ctx;

/// Count (in the agent's metrics) and log one refusal at a limit.
pub fn refused(ctx: &Ctx, direction: &'static str, reason: &'static str) {
    ctx.metrics.refuse(direction, reason);
    ctx.limiter.log_refusal(direction, reason);
}

/// Accept connections on `listener` until aborted; each gets a connection
/// slot and a task running `handle`, or is reset at once when the agent is
/// at its limit (`on_refused` lets the caller release what the connection
/// left behind, such as its capture record).
pub async fn accept_loop<H, Fut>(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    direction: &'static str,
    on_refused: fn(&Ctx, &TcpStream),
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr, Arc<Ctx>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            // Listeners close when a drain begins; one accepted in that
            // instant is refused like the ones after it (but served after a
            // hand-over, when the successor takes the ones after it).
            Ok((tcp, _)) if ctx.refuses_new_work() => {
                on_refused(&ctx, &tcp);
                ctx.metrics.refuse(direction, "draining");
                mesh_core::hbone::splice::reset_tcp(&tcp);
            }
            Ok((tcp, peer)) => match ctx.limiter.connection() {
                Some(slot) => {
                    let fut = handle(tcp, peer, ctx.clone());
                    tokio::spawn(async move {
                        fut.await;
                        drop(slot);
                    });
                }
                None => {
                    on_refused(&ctx, &tcp);
                    refused(&ctx, direction, "connection_limit");
                    mesh_core::hbone::splice::reset_tcp(&tcp);
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = ?local, direction, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Nothing to release for a refused connection.
pub fn nothing(_: &Ctx, _: &TcpStream) {}
