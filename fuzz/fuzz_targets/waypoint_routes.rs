//! The waypoint's request routing: HTTPRoutes from a fuzzed mesh file, and
//! a fuzzed request (method, path, query, headers) matched against every
//! route table, with the path and header rewrites the match selects.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use mesh_core::model::MeshModel;
use waypoint::routes::{modify_headers, modify_path, query_pairs, RouteTable};

const BASE: &str = "trustDomain: cluster.local
nodes: [{name: n}]
workloads:
  - {name: a, namespace: shop, node: n, ips: [10.0.0.1], labels: {app: echo}}
services:
  - {name: echo, namespace: shop, vips: [10.9.0.1], ports: [{port: 80, targetPort: 8080}], selector: {app: echo}}
gateways:
  - metadata: {name: waypoint, namespace: shop}
    spec: {gatewayClassName: istio-waypoint}
";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    routes: &'a str,
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let text = format!("{BASE}httpRoutes:\n{}", input.routes);
    let Ok(model) = MeshModel::from_yaml(&text, "fuzz") else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(input.method.as_bytes()) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in &input.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            headers.append(k, v);
        }
    }
    let _ = query_pairs(input.query).count();
    for svc in &model.services {
        for port in &svc.ports {
            // Callers of the service's own namespace (routes bound there).
            let Ok(table) = RouteTable::build(&model, svc, port.port, &svc.namespace) else {
                continue;
            };
            if let Some(routed) = table.find(&method, input.path, input.query, &headers) {
                let rule = routed.rule;
                let paths = [
                    rule.rewrite.as_ref().and_then(|r| r.path.as_ref()),
                    rule.redirect.as_ref().and_then(|r| r.path.as_ref()),
                ];
                for m in paths.into_iter().flatten() {
                    let _ = modify_path(m, input.path, routed.matched_prefix);
                }
                for m in [&rule.request_headers, &rule.response_headers]
                    .into_iter()
                    .flatten()
                {
                    let mut h = headers.clone();
                    modify_headers(m, &mut h);
                }
            }
        }
    }
});
