//! Phase 5, `redirect` / `rewrite`: a rule's `RequestRedirect` is answered
//! here (Gateway API's `Location` rules); otherwise the request is edited
//! for the upstream hop — the authorizers' headers, the rule's header
//! modifier and `URLRewrite` (path, host), W3C trace context (a new span
//! under the client's, or a new sampled trace), `x-request-id`, and no
//! hop-by-hop headers.

use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use mesh_core::model::gateway::RequestRedirect;
use rand::Rng;

use crate::proxy::answer::{Local, ResponseFlag, TraceIds};
use crate::routes::{modify_headers, modify_path, Rule};

/// The redirect answer, when the rule redirects.
pub fn redirect(
    rule: &Rule,
    matched_prefix: Option<&str>,
    host: &str,
    service_port: u16,
    uri: &Uri,
) -> Option<Local> {
    let r = rule.redirect.as_ref()?;
    let location = redirect_location(
        r,
        host,
        service_port,
        uri.path(),
        uri.query().unwrap_or(""),
        matched_prefix,
    );
    let status = r
        .status_code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::FOUND);
    let mut l = Local::text(
        status,
        ResponseFlag::None,
        format!("redirect to {location}"),
        "redirect",
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        l.headers.insert(http::header::LOCATION, v);
    }
    Some(l)
}

/// Edit the request for the upstream hop; its place in the trace.
pub fn rewrite(
    parts: &mut Parts,
    rule: &Rule,
    matched_prefix: Option<&str>,
    from_authorizers: &HeaderMap,
) -> TraceIds {
    for (name, value) in from_authorizers {
        parts.headers.insert(name.clone(), value.clone());
    }
    if let Some(m) = &rule.request_headers {
        modify_headers(m, &mut parts.headers);
    }
    if let Some(rw) = &rule.rewrite {
        if let Some(m) = &rw.path {
            let path = modify_path(m, parts.uri.path(), matched_prefix);
            let pq = match parts.uri.query() {
                Some(q) if !q.is_empty() => format!("{path}?{q}"),
                _ => path,
            };
            let mut uri = Uri::builder().path_and_query(pq.as_str());
            if let Some(a) = parts.uri.authority() {
                uri = uri
                    .scheme(parts.uri.scheme_str().unwrap_or("http"))
                    .authority(a.as_str());
            }
            if let Ok(u) = uri.build() {
                parts.uri = u;
            }
        }
        if let Some(h) = &rw.hostname {
            if let Ok(v) = HeaderValue::from_str(h) {
                parts.headers.insert(http::header::HOST, v);
                if parts.uri.authority().is_some() {
                    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                    if let Ok(u) = format!("http://{h}{pq}").parse() {
                        parts.uri = u;
                    }
                }
            }
        }
    }
    let trace = propagate_trace(&mut parts.headers);
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", rand::rng().random::<u128>());
        if let Ok(v) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", v);
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    trace
}

/// Headers that describe one hop, not the request.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
    if h.get("te").and_then(|v| v.to_str().ok()) != Some("trailers") {
        h.remove("te");
    }
}

/// W3C trace context: keep the trace, start a new span for the upstream
/// hop (or a new sampled trace when there is none).
fn propagate_trace(h: &mut HeaderMap) -> TraceIds {
    let mut rng = rand::rng();
    let parent = h
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let p: Vec<&str> = v.trim().split('-').collect();
            let hex = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
            (p.len() >= 4
                && hex(p[0], 2)
                && p[0] != "ff"
                && hex(p[1], 32)
                && hex(p[2], 16)
                && hex(p[3], 2)
                && p[1] != "00000000000000000000000000000000")
                .then(|| {
                    (
                        p[1].to_ascii_lowercase(),
                        p[3].to_string(),
                        p[2].to_ascii_lowercase(),
                    )
                })
        });
    let (trace, flags, parent) = match parent {
        Some((t, f, p)) => (t, f, Some(p)),
        None => (
            format!("{:032x}", rng.random::<u128>() | 1),
            "01".into(),
            None,
        ),
    };
    let span = format!("{:016x}", rng.random::<u64>() | 1);
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace}-{span}-{flags}")) {
        h.insert("traceparent", v);
    }
    TraceIds {
        trace,
        span,
        parent,
    }
}

/// The `Location` of a redirect, as Gateway API derives it: the scheme,
/// host and path of the filter or of the request; the port of the filter,
/// else the scheme's well-known port when the filter sets a scheme, else the
/// port the request came to (the service port); and no port in `Location`
/// when it is the scheme's default (80 for http, 443 for https).
fn redirect_location(
    r: &RequestRedirect,
    request_host: &str,
    service_port: u16,
    path: &str,
    query: &str,
    matched_prefix: Option<&str>,
) -> String {
    let host = strip_port(request_host);
    let host = r.hostname.as_deref().unwrap_or(host);
    let path = match &r.path {
        Some(m) => modify_path(m, path, matched_prefix),
        None => path.to_string(),
    };
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = r.port.unwrap_or(if r.scheme.is_some() {
        default_port
    } else {
        service_port
    });
    let port = if port == default_port {
        String::new()
    } else {
        format!(":{port}")
    };
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{host}{port}{path}{q}")
}

/// A `Host` without its port (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing;
    use http::Request;
    use mesh_core::model::gateway::{
        HeaderModifier, HttpHeader, PathModifier, PathModifierType, UrlRewrite,
    };

    /// Gateway API `HTTPRequestRedirectFilter.port` (conformance:
    /// MeshHTTPRouteRedirectPort, HTTPRouteRedirectPortAndScheme): without a
    /// port, the scheme's well-known port when a scheme is set, else the
    /// port the request came to; never the default port of the scheme in
    /// `Location`.
    #[test]
    fn redirect_ports_follow_gateway_api() {
        let loc = |r: RequestRedirect, service_port: u16| {
            redirect_location(&r, "echo:8080", service_port, "/p", "", None)
        };
        let r = |scheme: Option<&str>, port: Option<u16>| RequestRedirect {
            scheme: scheme.map(str::to_string),
            port,
            ..Default::default()
        };
        assert_eq!(loc(r(None, None), 8080), "http://echo:8080/p");
        assert_eq!(loc(r(None, None), 80), "http://echo/p");
        assert_eq!(loc(r(None, Some(8083)), 8080), "http://echo:8083/p");
        assert_eq!(loc(r(None, Some(80)), 8080), "http://echo/p");
        assert_eq!(loc(r(Some("https"), None), 8080), "https://echo/p");
        assert_eq!(loc(r(Some("https"), Some(443)), 8080), "https://echo/p");
        assert_eq!(
            loc(r(Some("https"), Some(8443)), 8080),
            "https://echo:8443/p"
        );
        assert_eq!(loc(r(Some("http"), None), 8080), "http://echo/p");
        let host = RequestRedirect {
            hostname: Some("example.org".into()),
            ..Default::default()
        };
        assert_eq!(
            redirect_location(&host, "[fd00::1]:8080", 8080, "/p", "a=b", None),
            "http://example.org:8080/p?a=b"
        );
    }

    #[test]
    fn a_redirect_is_a_local_answer_with_location() {
        let mut rule = testing::rule();
        rule.redirect = Some(RequestRedirect {
            hostname: Some("example.com".into()),
            status_code: Some(301),
            ..Default::default()
        });
        let uri: Uri = "/moved/x?y=1".parse().unwrap();
        let l = redirect(&rule, None, "reviews", 80, &uri).unwrap();
        assert_eq!((l.status.as_u16(), l.flag), (301, ResponseFlag::None));
        assert_eq!(
            l.headers.get(http::header::LOCATION).unwrap(),
            "http://example.com/moved/x?y=1"
        );
        assert!(redirect(&testing::rule(), None, "reviews", 80, &uri).is_none());
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn url_rewrite_replaces_the_matched_prefix_and_the_host_and_keeps_the_query() {
        let mut rule = testing::rule();
        rule.rewrite = Some(UrlRewrite {
            hostname: Some("new.example".into()),
            path: Some(PathModifier {
                kind: PathModifierType::ReplacePrefixMatch,
                replace_prefix_match: Some("/v2".into()),
                replace_full_path: None,
            }),
        });
        rule.request_headers = Some(HeaderModifier {
            set: vec![HttpHeader {
                name: "x-added".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        });
        let mut from_authorizers = HeaderMap::new();
        from_authorizers.insert("x-authz-user", HeaderValue::from_static("alice"));
        let mut p = parts("/old/page?a=1", &[("host", "reviews")]);
        rewrite(&mut p, &rule, Some("/old"), &from_authorizers);
        assert_eq!(p.uri, "/v2/page?a=1");
        assert_eq!(p.headers["host"], "new.example");
        assert_eq!(p.headers["x-added"], "yes");
        assert_eq!(p.headers["x-authz-user"], "alice");
        // Absolute-form (HTTP/2 :authority) follows the new host.
        let mut p = parts("http://reviews/old", &[]);
        rewrite(&mut p, &rule, Some("/old"), &HeaderMap::new());
        assert_eq!(p.uri, "http://new.example/v2");
    }

    #[test]
    fn the_upstream_hop_gets_a_child_span_a_request_id_and_no_hop_headers() {
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut p = parts(
            "/",
            &[
                ("traceparent", client),
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("upgrade", "h2c"),
                ("te", "gzip"),
            ],
        );
        let t = rewrite(&mut p, &testing::rule(), None, &HeaderMap::new());
        assert_eq!(t.trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(
            p.headers["traceparent"],
            format!("00-{}-{}-01", t.trace, t.span).as_str()
        );
        assert_ne!(t.span, "00f067aa0ba902b7");
        assert_eq!(p.headers["x-request-id"].len(), 32);
        for h in ["connection", "keep-alive", "upgrade", "te"] {
            assert!(!p.headers.contains_key(h), "{h} should be gone");
        }
        // `te: trailers` (gRPC) stays; a given request id is kept; a
        // malformed traceparent starts a new sampled trace.
        let mut p = parts(
            "/",
            &[
                ("te", "trailers"),
                ("x-request-id", "abc"),
                ("traceparent", "00-zz-1-01"),
            ],
        );
        let t = rewrite(&mut p, &testing::rule(), None, &HeaderMap::new());
        assert_eq!(p.headers["te"], "trailers");
        assert_eq!(p.headers["x-request-id"], "abc");
        assert!(t.parent.is_none());
        assert!(p.headers["traceparent"].to_str().unwrap().ends_with("-01"));
    }
}
