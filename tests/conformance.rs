//! Gateway API mesh (GAMMA) conformance through a real waypoint: real
//! agents with eBPF capture, a real `sluice-waypoint`, and `curl` in the
//! client pods, on cases taken from the upstream conformance suite
//! (`conformance/tests/mesh/*` and the HTTPRoute tests; named after them)
//! and from the Gateway API spec where the suite is silent. The backends
//! echo the request as JSON (`x-echo: json`), as the suite's echo server
//! does, so each case checks what reached which backend.
//!
//! Topology: node-a runs `client` (namespace `shop`), `consumer` (namespace
//! `consumer`) and the waypoint `shop/waypoint`; node-b runs `echo-v1`,
//! `echo-v2` (`shop`) and `far` (namespace `far`). Service `shop/echo`
//! (10.96.0.30, ports 80 and 8080) uses the waypoint.

use std::collections::BTreeMap;

use sluice_tests::netns::*;
use sluice_tests::write_atomic;

const VIP: &str = "10.96.0.30";

fn cluster() -> Topology {
    let mut t = Topology::new();
    t.add_node("node-a");
    t.add_node("node-b");
    t.add_pod("node-a", "client", 1);
    t.add_pod("node-a", "consumer", 2);
    t.add_pod("node-a", "waypoint", 5);
    t.add_pod("node-b", "echo-v1", 1);
    t.add_pod("node-b", "echo-v2", 2);
    t.add_pod("node-b", "far", 3);
    let mut y = String::from(
        r#"nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
  - {name: consumer, labels: {istio.io/dataplane-mode: ambient}}
  - {name: far, labels: {istio.io/dataplane-mode: ambient}}
workloads:
"#,
    );
    for p in &t.pods {
        let (ns, sa, labels) = match p.name.as_str() {
            "waypoint" => (
                "shop",
                "waypoint",
                "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
                    .to_string(),
            ),
            n if n.starts_with("echo-") => {
                ("shop", "echo", format!("app: echo, version: {}", &n[5..]))
            }
            "consumer" => ("consumer", "consumer", "app: consumer".to_string()),
            "far" => ("far", "far", "app: far".to_string()),
            n => ("shop", n, format!("app: {n}")),
        };
        y.push_str(&format!(
            "  - {{name: {n}, namespace: {ns}, serviceAccount: {sa}, node: {node}, ips: [\"{ip}\", \"{ip6}\"], netns: {netns}, labels: {{{labels}}}}}\n",
            n = p.name,
            node = p.node,
            ip = p.ip,
            ip6 = p.ip6,
            netns = p.ns
        ));
    }
    y.push_str(ROUTES);
    write_atomic(&t.mesh_file(), &y);
    t
}

const ROUTES: &str = r#"services:
  - {name: echo, namespace: shop, vips: ["10.96.0.30"], ports: [{port: 80, targetPort: 8080}, {port: 8080, targetPort: 8080}], selector: {app: echo}}
  - {name: echo-v1, namespace: shop, vips: ["10.96.0.31"], ports: [{port: 80, targetPort: 8080}], selector: {app: echo, version: v1}}
  - {name: echo-v2, namespace: shop, ports: [{port: 80, targetPort: 8080}], selector: {app: echo, version: v2}}
  - {name: far, namespace: far, ports: [{port: 80, targetPort: 8080}], selector: {app: far}}
  - {name: granted, namespace: far, ports: [{port: 80, targetPort: 8080}], selector: {app: far}}
gateways:
  - metadata: {name: waypoint, namespace: shop}
    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
referenceGrants:
  - metadata: {name: shop-to-granted, namespace: far}
    spec:
      from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
      to: [{group: "", kind: Service, name: granted}]
httpRoutes:
  - metadata: {name: echo, namespace: shop}
    spec:
      parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
      rules:
        - matches: [{path: {type: Exact, value: /exact}}]
          backendRefs: [{name: echo-v2, port: 80}]
        - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
          backendRefs: [{name: echo-v2, port: 80}]
        - matches: [{path: {value: /dup}, headers: [{name: version, value: two}, {name: Version, value: one}]}]
          backendRefs: [{name: echo-v2, port: 80}]
        - matches: [{path: {value: /query}, queryParams: [{name: q, value: a}, {name: q, value: b}]}]
          backendRefs: [{name: echo-v2, port: 80}]
        - matches: [{path: {value: /method}, method: POST}]
          backendRefs: [{name: echo-v2, port: 80}]
        - matches: [{path: {value: /headers}}]
          backendRefs: [{name: echo-v1, port: 80}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: X-Header-Set, value: set-first}, {name: x-header-set, value: set-second}]
                add: [{name: X-Header-Add, value: add-first}, {name: X-Header-Add, value: add-second}]
                remove: [X-Header-Remove]
            - type: ResponseHeaderModifier
              responseHeaderModifier:
                set: [{name: X-Response-Set, value: yes}]
        - matches: [{path: {value: /rewrite}}]
          backendRefs: [{name: echo-v1, port: 80}]
          filters:
            - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}}}
        - matches: [{path: {value: /full}}]
          backendRefs: [{name: echo-v1, port: 80}]
          filters:
            - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}
        - matches: [{path: {value: /redirect-host}}]
          filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]
        - matches: [{path: {value: /redirect-port}}]
          filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
        - matches: [{path: {value: /redirect-scheme}}]
          filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
        - matches: [{path: {value: /redirect-path}}]
          filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}}]
        - matches: [{path: {value: /redirect-308}}]
          filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]
        - matches: [{path: {value: /weight}}]
          backendRefs: [{name: echo-v1, port: 80, weight: 0}, {name: echo-v2, port: 80, weight: 1}]
        - matches: [{path: {value: /slow-zero}}]
          backendRefs: [{name: echo-v1, port: 80}]
          timeouts: {request: 0s, backendRequest: 0s}
        - matches: [{path: {value: /slow-limited}}]
          backendRefs: [{name: echo-v1, port: 80}]
          timeouts: {request: 500ms}
        - matches: [{path: {value: /far}}]
          backendRefs: [{name: far, namespace: far, port: 80}]
        - matches: [{path: {value: /granted}}]
          backendRefs: [{name: granted, namespace: far, port: 80}]
        - matches: [{path: {value: /half}}]
          backendRefs: [{name: ghost, port: 80}, {name: echo-v1, port: 80}]
        - matches: [{path: {value: /kind}}]
          backendRefs: [{name: echo-v1, kind: ConfigMap, port: 80}]
        - backendRefs: [{name: echo-v1, port: 80}]
  - metadata: {name: b-tie, namespace: shop}
    spec:
      parentRefs: [{name: echo, port: 80}]
      rules: [{matches: [{path: {value: /tie}}], backendRefs: [{name: echo-v1, port: 80}]}]
  - metadata: {name: a-tie, namespace: shop}
    spec:
      parentRefs: [{name: echo, port: 80}]
      rules: [{matches: [{path: {value: /tie}}], backendRefs: [{name: echo-v2, port: 80}]}]
  - metadata: {name: port-8080, namespace: shop}
    spec:
      parentRefs: [{name: echo, port: 8080}]
      rules:
        - matches: [{path: {value: /redirect-path}}]
          filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}}}]
        - backendRefs: [{name: echo-v2, port: 80}]
  - metadata: {name: consumer-route, namespace: consumer}
    spec:
      parentRefs: [{group: "", kind: Service, name: echo, namespace: shop, port: 80}]
      rules:
        - backendRefs: [{name: echo, namespace: shop, port: 80}]
          filters:
            - type: ResponseHeaderModifier
              responseHeaderModifier:
                set: [{name: X-Header-Set, value: set}]
"#;

/// One response as `curl -i` shows it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// The echoed request (JSON), if a backend answered.
    fn echoed(&self) -> serde_json::Value {
        serde_json::from_str(self.body.trim()).unwrap_or(serde_json::Value::Null)
    }

    /// Which backend answered (`echo-v1`, `echo-v2`, `far`).
    fn backend(&self) -> String {
        self.echoed()["name"].as_str().unwrap_or("-").to_string()
    }

    fn request_header(&self, name: &str) -> Vec<String> {
        self.echoed()["headers"][name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A request from `pod` with `curl` (no redirects followed), the backend
/// asked to echo it as JSON.
fn request(t: &Topology, pod: &str, args: &[&str]) -> Answer {
    let mut all = vec![
        "curl",
        "-sS",
        "-i",
        "--max-time",
        "10",
        "-H",
        "x-echo: json",
    ];
    all.extend_from_slice(args);
    let out = t.run_in(pod, &all);
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers
                .entry(k.trim().to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    Answer {
        status,
        headers,
        body: body.to_string() + &String::from_utf8_lossy(&out.stderr),
    }
}

fn url(path: &str) -> String {
    format!("http://{VIP}{path}")
}

/// Each case is named after the upstream conformance test it follows (or
/// the Gateway API rule, where the suite has no test), and checked with a
/// real client through the real waypoint.
#[test]
fn gateway_api_mesh_conformance_through_a_real_waypoint() {
    if !e2e_available() {
        return;
    }
    let mut t = cluster();
    let _v1 = http_in(t.pod("echo-v1"), 8080, "echo-v1");
    let _v2 = http_in(t.pod("echo-v2"), 8080, "echo-v2");
    let _far = http_in(t.pod("far"), 8080, "far");
    t.start_agent("node-a");
    t.start_agent("node-b");
    t.start_waypoint("waypoint", "shop/waypoint");
    let get = |path: &str| request(&t, "client", &[&url(path)]);
    let mut passed: Vec<&str> = vec![];
    let mut check = |name: &'static str, ok: bool, what: &dyn std::fmt::Debug| {
        assert!(ok, "{name}: {what:?}\n{}", t.agent_log("node-a"));
        passed.push(name);
    };

    // MeshBasic / MeshHTTPRouteSimpleSameNamespace: the route's default
    // rule, host and path unchanged.
    let a = get("/hello");
    check(
        "MeshHTTPRouteSimpleSameNamespace",
        a.status == 200
            && a.backend() == "echo-v1"
            && a.echoed()["path"] == "/hello"
            && a.echoed()["host"] == VIP,
        &a,
    );
    // MeshBasic: a service without routes is served as it is.
    let a = request(&t, "client", &["http://10.96.0.31/exact"]);
    check("MeshBasic", a.status == 200 && a.backend() == "echo-v1", &a);
    // MeshFrontend: routes apply to the service's frontend (its VIP), not
    // to a pod addressed directly.
    let direct = format!("http://{}:8080/exact", t.pod("echo-v1").ip);
    let a = request(&t, "client", &[&direct]);
    check(
        "MeshFrontend",
        a.status == 200 && a.backend() == "echo-v1",
        &a,
    );
    // MeshHTTPRouteMatching: exact and segment-wise prefix paths.
    let a = get("/exact");
    check("MeshHTTPRouteMatching exact", a.backend() == "echo-v2", &a);
    let a = get("/exact/more");
    check(
        "MeshHTTPRouteMatching exact is not a prefix",
        a.backend() == "echo-v1",
        &a,
    );
    let a = get("/prefix/one/two");
    check("MeshHTTPRouteMatching prefix", a.backend() == "echo-v2", &a);
    let a = get("/prefix/onetwo");
    check(
        "MeshHTTPRouteMatching prefix by segment",
        a.backend() == "echo-v1",
        &a,
    );
    // HTTPRouteMatching (header names, first of duplicates).
    let a = request(&t, "client", &["-H", "version: two", &url("/dup")]);
    check(
        "HTTPRouteHeaderMatching first of duplicates",
        a.backend() == "echo-v2",
        &a,
    );
    let a = request(&t, "client", &["-H", "version: one", &url("/dup")]);
    check(
        "HTTPRouteHeaderMatching duplicate ignored",
        a.backend() == "echo-v1",
        &a,
    );
    // MeshHTTPRouteQueryParamMatching.
    let a = get("/query?q=a");
    check(
        "MeshHTTPRouteQueryParamMatching",
        a.backend() == "echo-v2",
        &a,
    );
    let a = get("/query?q=b");
    check(
        "MeshHTTPRouteQueryParamMatching duplicate ignored",
        a.backend() == "echo-v1",
        &a,
    );
    // HTTPRouteMethodMatching.
    let a = request(&t, "client", &["-X", "POST", &url("/method")]);
    check("HTTPRouteMethodMatching", a.backend() == "echo-v2", &a);
    let a = get("/method");
    check(
        "HTTPRouteMethodMatching other method",
        a.backend() == "echo-v1",
        &a,
    );
    // MeshHTTPRouteRequestHeaderModifier and response header modifier
    // (first of duplicate set/add names).
    let a = request(
        &t,
        "client",
        &[
            "-H",
            "X-Header-Remove: gone",
            "-H",
            "X-Header-Add: original",
            &url("/headers"),
        ],
    );
    check(
        "MeshHTTPRouteRequestHeaderModifier",
        a.request_header("x-header-set") == ["set-first"]
            && a.request_header("x-header-add") == ["original", "add-first"]
            && a.request_header("x-header-remove").is_empty(),
        &a,
    );
    check(
        "HTTPRouteResponseHeaderModifier",
        a.header("x-response-set") == Some("yes"),
        &a,
    );
    // MeshHTTPRouteRewritePath (ReplacePrefixMatch "" is "/") and host.
    let a = get("/rewrite/x");
    check(
        "MeshHTTPRouteRewritePath prefix to empty",
        a.echoed()["path"] == "/x" && a.echoed()["host"] == "rewritten.example",
        &a,
    );
    let a = get("/rewrite");
    check(
        "MeshHTTPRouteRewritePath to root",
        a.echoed()["path"] == "/",
        &a,
    );
    let a = get("/full/deep?k=v");
    check(
        "MeshHTTPRouteRewritePath full path",
        a.echoed()["path"] == "/one?k=v",
        &a,
    );
    // MeshHTTPRouteRedirectHostAndStatus, RedirectPort, RedirectScheme,
    // RedirectPath, 308.
    let a = get("/redirect-host");
    check(
        "MeshHTTPRouteRedirectHostAndStatus",
        a.status == 301 && a.header("location") == Some("http://example.org/redirect-host"),
        &a,
    );
    let a = get("/redirect-port");
    check(
        "MeshHTTPRouteRedirectPort",
        a.status == 302
            && a.header("location") == Some(&format!("http://{VIP}:8083/redirect-port")),
        &a,
    );
    let a = get("/redirect-scheme");
    check(
        "MeshHTTPRouteRedirectScheme",
        a.status == 302 && a.header("location") == Some(&format!("https://{VIP}/redirect-scheme")),
        &a,
    );
    let a = get("/redirect-path/a");
    check(
        "MeshHTTPRouteRedirectPath",
        a.header("location") == Some(&format!("http://{VIP}/moved/a")),
        &a,
    );
    let a = get("/redirect-308");
    check("MeshHTTPRoute308Redirect", a.status == 308, &a);
    let a = request(&t, "client", &[&format!("http://{VIP}:8080/redirect-path")]);
    check(
        "MeshHTTPRouteRedirectPath keeps a non-default service port",
        a.status == 302 && a.header("location") == Some(&format!("http://{VIP}:8080/new")),
        &a,
    );
    // MeshPorts: a route attached to one port does not change the other
    // (on port 80 /hello goes to echo-v1).
    let a = request(&t, "client", &[&format!("http://{VIP}:8080/hello")]);
    check("MeshPorts", a.backend() == "echo-v2" && a.status == 200, &a);
    // MeshHTTPRouteWeight: weight 0 gets nothing.
    let all_v2 = (0..20).all(|_| get("/weight").backend() == "echo-v2");
    check(
        "MeshHTTPRouteWeight zero weight",
        all_v2,
        &"echo-v1 answered",
    );
    // HTTPRouteTimeoutRequest with 0s: disabled (the backend takes 2 s).
    let a = get("/slow-zero");
    check("HTTPRouteRequestTimeout zero disables", a.status == 200, &a);
    let a = get("/slow-limited");
    check("HTTPRouteRequestTimeout", a.status == 504, &a);
    // HTTPRouteCrossNamespace without / with a ReferenceGrant.
    let a = get("/far");
    check(
        "HTTPRouteReferenceGrant missing: 500",
        a.status == 500 && a.backend() == "-",
        &a,
    );
    let a = get("/granted");
    check(
        "HTTPRouteReferenceGrant present",
        a.status == 200 && a.backend() == "far",
        &a,
    );
    // HTTPRouteInvalidBackendRefUnknownKind / a missing backend: 500 for
    // its share, the rest served.
    let a = get("/kind");
    check("HTTPRouteInvalidBackendRefUnknownKind", a.status == 500, &a);
    let codes: Vec<u16> = (0..40).map(|_| get("/half").status).collect();
    let errors = codes.iter().filter(|&&c| c == 500).count();
    let served = codes.iter().filter(|&&c| c == 200).count();
    check(
        "HTTPRouteInvalidBackend share gets 500",
        errors + served == 40 && (5..=35).contains(&errors),
        &codes,
    );
    // Precedence ties: no timestamps in a mesh file, so the name decides
    // (a-tie before b-tie), not the order of the file.
    let a = get("/tie");
    check("HTTPRoute tie-break by name", a.backend() == "echo-v2", &a);
    // MeshConsumerRoute: the consumer's route for its own namespace only.
    let a = request(&t, "consumer", &[&url("/exact")]);
    check(
        "MeshConsumerRoute from the consumer namespace",
        a.status == 200 && a.header("x-header-set") == Some("set"),
        &a,
    );
    let a = get("/exact");
    check(
        "MeshConsumerRoute not from other namespaces",
        a.status == 200 && a.header("x-header-set").is_none() && a.backend() == "echo-v2",
        &a,
    );
    eprintln!("conformance cases passed: {}", passed.len());
    for p in &passed {
        eprintln!("  ok {p}");
    }
}
