//! Phase 1, `route`: the rule a request follows — the first match of the
//! service port's compiled routes (Gateway API precedence, see
//! [`crate::routes`]), or a local 404 when routes exist and none matches.

use http::{Request, StatusCode};

use crate::proxy::answer::{Local, ResponseFlag};
use crate::routes::{RouteError, RouteTable, Routed};

/// The routed rule of `req`, or the 404 answer.
pub fn select<'t, B>(table: &'t RouteTable, req: &Request<B>) -> Result<Routed<'t>, Local> {
    let query = req.uri().query().unwrap_or("");
    table
        .find(req.method(), req.uri().path(), query, req.headers())
        .ok_or_else(|| {
            Local::text(
                StatusCode::NOT_FOUND,
                ResponseFlag::NoRoute,
                "no route matches",
                "no route",
            )
        })
}

/// The answer when the routes of the service cannot be compiled (only for
/// objects that bypassed validation): a 500 naming the route.
pub fn misconfigured(e: RouteError) -> Local {
    Local::text(
        StatusCode::INTERNAL_SERVER_ERROR,
        ResponseFlag::NoRoute,
        e.to_string(),
        "route configuration error",
    )
}

/// The answer when the service the tunnel named has left the model.
pub fn service_gone() -> Local {
    Local::text(
        StatusCode::SERVICE_UNAVAILABLE,
        ResponseFlag::NoRoute,
        "service is gone",
        "no such service",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing;

    #[test]
    fn the_first_matching_rule_is_chosen_and_a_miss_is_a_404() {
        let model = testing::model(
            r#"
httpRoutes:
  - metadata: {name: r, namespace: shop}
    spec:
      parentRefs: [{name: reviews}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          backendRefs: [{name: reviews, port: 80}]
"#,
        );
        let table = testing::table(&model);
        let get = |uri: &str| Request::get(uri).body(()).unwrap();
        let routed = select(&table, &get("/api/x")).unwrap();
        assert_eq!(routed.rule.id, "shop/r#0");
        assert_eq!(routed.matched_prefix, Some("/api"));
        let miss = select(&table, &get("/other")).unwrap_err();
        assert_eq!(
            (miss.status, miss.flag),
            (StatusCode::NOT_FOUND, ResponseFlag::NoRoute)
        );
        assert_eq!(&miss.body[..], b"no route\n");
    }

    #[test]
    fn without_routes_everything_goes_to_the_service() {
        let model = testing::model("");
        let table = testing::table(&model);
        let routed = select(&table, &Request::post("/any?x=1").body(()).unwrap()).unwrap();
        assert_eq!(routed.rule.backends.len(), 1);
        assert_eq!(routed.rule.backends[0].name, "reviews");
    }
}
