//! Phase 6, `mirror`: for each of the rule's `RequestMirror` filters (at
//! its percentage), a copy of the request goes to the shadow backend in
//! the background; its answer is read and dropped, its failure only
//! logged. As in Istio, the copy's `Host` gets a `-shadow` suffix. Only
//! buffered requests are mirrored (the body must be sent twice).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::BodyExt;
use mesh_core::model::MeshModel;

use crate::backend::Backends;
use crate::proxy::answer::full;
use crate::routes::Backend;

/// Where the copies come from and go.
pub struct Mirror<'a, B> {
    pub backends: &'a Arc<B>,
    pub model: &'a Arc<MeshModel>,
    pub source_ip: IpAddr,
    /// The request's host (before any rewrite).
    pub host: &'a str,
}

impl<B: Backends> Mirror<'_, B> {
    /// Send the copies the rule's mirrors ask for, rolling each one's
    /// percentage with `roll`; returns at once.
    pub fn spawn(
        &self,
        mirrors: &[(Backend, u32)],
        parts: &Parts,
        body: &Bytes,
        mut roll: impl FnMut(f64) -> bool,
    ) {
        for (backend, percent) in mirrors {
            if !roll(*percent as f64) {
                continue;
            }
            let mut copy = Request::from_parts(clone_parts(parts), ());
            copy.headers_mut().remove(http::header::CONTENT_LENGTH);
            shadow_host(copy.headers_mut(), self.host);
            let (p, ()) = copy.into_parts();
            let (backends, model, backend, body, source_ip) = (
                self.backends.clone(),
                self.model.clone(),
                backend.clone(),
                body.clone(),
                self.source_ip,
            );
            tokio::spawn(async move {
                let req = Request::from_parts(p, full(body));
                match backends.send(&model, source_ip, &backend, req, &[]).await {
                    // Read and drop: the caller never sees it.
                    Ok(sent) => drop(sent.response.into_body().collect().await),
                    Err(e) => {
                        tracing::debug!(backend = %backend.name, error = %e.reason, "mirror request failed (ignored)")
                    }
                }
            });
        }
    }
}

/// A copy of a request's head (for another attempt or a mirror).
pub fn clone_parts(p: &Parts) -> Parts {
    let mut r = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version)
        .body(())
        .expect("parts of a valid request");
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// Istio marks the shadow's host with a `-shadow` suffix (before the port).
fn shadow_host(h: &mut HeaderMap, host: &str) {
    let (name, port) = host
        .split_once(':')
        .map_or((host, None), |(n, p)| (n, Some(p)));
    let shadow = match port {
        Some(p) => format!("{name}-shadow:{p}"),
        None => format!("{name}-shadow"),
    };
    if let Ok(v) = HeaderValue::from_str(&shadow) {
        h.insert(http::header::HOST, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::{self, FakeBackends};

    #[tokio::test]
    async fn copies_go_to_the_shadow_with_its_host_and_the_same_body() {
        let backends = Arc::new(FakeBackends::default());
        let model = Arc::new(testing::model(""));
        let m = Mirror {
            backends: &backends,
            model: &model,
            source_ip: "10.0.0.9".parse().unwrap(),
            host: "reviews:8080",
        };
        let parts = Request::post("/orders")
            .header("host", "reviews:8080")
            .header("content-length", "5")
            .header("x-user", "alice")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mirrors = vec![
            (testing::backend("shadow"), 100),
            (testing::backend("never"), 0),
        ];
        m.spawn(&mirrors, &parts, &Bytes::from_static(b"hello"), |p| {
            p >= 100.0
        });
        let seen = backends.wait_for(1).await;
        assert_eq!(seen[0].backend, "shadow");
        assert_eq!(seen[0].headers["host"], "reviews-shadow:8080");
        assert_eq!(seen[0].headers["x-user"], "alice");
        assert!(!seen[0].headers.contains_key("content-length"));
        assert_eq!(&seen[0].body[..], b"hello");
        assert_eq!(seen[0].path, "/orders");
    }

    #[test]
    fn shadow_hosts_keep_their_port() {
        let mut h = HeaderMap::new();
        shadow_host(&mut h, "web");
        assert_eq!(h["host"], "web-shadow");
        shadow_host(&mut h, "web.shop:80");
        assert_eq!(h["host"], "web.shop-shadow:80");
    }
}
