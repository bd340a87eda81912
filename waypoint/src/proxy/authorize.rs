//! Phase 2, `authorize`: the AuthorizationPolicies that apply at this
//! waypoint for the service. `CUSTOM` policies first, each matching one
//! asking its external authorizer ([`crate::extauthz`]; a denial is the
//! authorizer's own answer, flag `UAEX`); then `DENY`/`ALLOW`/`AUDIT` as
//! Istio evaluates them (403 `RBAC: access denied`, flag `RBAC`). Dry-run
//! outcomes are counted, never enforced. An allow hands on the headers the
//! authorizers asked to add upstream.

use http::{HeaderMap, Request, StatusCode};
use mesh_core::model::policy::AuthorizationAction;
use mesh_core::model::MeshModel;
use mesh_core::policy::{evaluate, matching_custom, waypoint_policies, HttpAttrs, RequestInfo};

use crate::extauthz::{Authorizer, CheckInput, Verdict};
use crate::proxy::answer::{Local, ResponseFlag};
use crate::proxy::ConnCtx;
use crate::telemetry::{PolicyLabels, WaypointMetrics};

/// Where the phase looks: the model, the waypoint it runs as, who decides
/// `CUSTOM` policies, and where denials are counted.
pub struct Authorize<'a, A> {
    pub model: &'a MeshModel,
    /// The waypoint's Gateway (namespace, name).
    pub waypoint: (&'a str, &'a str),
    pub authorizer: &'a A,
    pub metrics: &'a WaypointMetrics,
}

const DENIED: &str = "RBAC: access denied";

impl<A: Authorizer> Authorize<'_, A> {
    /// Allow (with the headers to add upstream) or the denial to answer.
    pub async fn check<B>(
        &self,
        conn: &ConnCtx,
        host: &str,
        req: &Request<B>,
    ) -> Result<HeaderMap, Local> {
        let policies = waypoint_policies(
            self.model,
            self.waypoint.0,
            self.waypoint.1,
            &conn.service_namespace,
            &conn.service_name,
        );
        let info = RequestInfo {
            source_identity: Some(&conn.source_identity),
            source_ip: conn.source_ip,
            destination_ip: conn.target.ip(),
            destination_port: conn.port,
            http: Some(HttpAttrs {
                method: req.method().as_str(),
                path: req.uri().path(),
                host,
                headers: req.headers(),
            }),
        };
        let mut allowed_headers = HeaderMap::new();
        let service = format!(
            "{}.{}.svc.cluster.local",
            conn.service_name, conn.service_namespace
        );
        for p in matching_custom(&policies, &info) {
            let policy = format!("{}/{}", p.metadata.namespace, p.metadata.name);
            let provider = p.spec.provider.as_ref().and_then(|pr| {
                self.model
                    .extension_providers
                    .iter()
                    .find(|e| e.name == pr.name)
            });
            let Some(provider) = provider else {
                return Err(Local::text(
                    StatusCode::FORBIDDEN,
                    ResponseFlag::ExtAuthzDenied,
                    format!("policy {policy}: unknown extension provider"),
                    DENIED,
                ));
            };
            let input = CheckInput {
                method: req.method(),
                path_and_query: req.uri().path_and_query().map_or("/", |x| x.as_str()),
                host,
                headers: req.headers(),
                protocol: req.version(),
                source_identity: &conn.source_identity,
                source_ip: conn.source_ip,
                destination: conn.target,
                destination_service: &service,
            };
            match self.authorizer.check(provider, &input).await {
                Verdict::Allow(h) => allowed_headers.extend(h),
                Verdict::Deny {
                    status,
                    headers,
                    body,
                    reason,
                } => {
                    self.count_denial(policy);
                    return Err(Local {
                        status,
                        flag: ResponseFlag::ExtAuthzDenied,
                        reason,
                        headers: Box::new(headers),
                        body,
                    });
                }
            }
        }
        let rest: Vec<_> = policies
            .iter()
            .copied()
            .filter(|p| p.spec.action != AuthorizationAction::Custom)
            .collect();
        let decision = evaluate(&rest, &info);
        if !decision.dry_run.is_empty() {
            let what = format!(
                "{} ({}) -> {} {}{}",
                conn.source_ip,
                conn.source_identity,
                req.method(),
                host,
                req.uri().path()
            );
            self.metrics.policy.record_dry_run(&decision.dry_run, &what);
        }
        if !decision.allowed {
            self.count_denial(decision.policy.unwrap_or_else(|| "-".into()));
            return Err(Local::text(
                StatusCode::FORBIDDEN,
                ResponseFlag::RbacDenied,
                decision.reason,
                DENIED,
            ));
        }
        Ok(allowed_headers)
    }

    fn count_denial(&self, policy: String) {
        self.metrics
            .denials
            .get_or_create(&PolicyLabels { policy })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing;
    use bytes::Bytes;
    use http::HeaderValue;
    use mesh_core::model::gateway::ExtensionProviderConfig;
    use std::sync::Mutex;

    /// An authorizer that denies `/ext/deny*` with its own answer and
    /// allows the rest, adding `x-authz-user`; it notes what it was asked.
    #[derive(Default)]
    struct FakeAuthorizer {
        asked: Mutex<Vec<(String, String, String)>>,
    }

    impl Authorizer for FakeAuthorizer {
        async fn check(
            &self,
            provider: &ExtensionProviderConfig,
            input: &CheckInput<'_>,
        ) -> Verdict {
            self.asked.lock().unwrap().push((
                provider.name.clone(),
                input.path_and_query.to_string(),
                input.source_identity.to_string(),
            ));
            if input.path_and_query.starts_with("/ext/deny") {
                let mut headers = HeaderMap::new();
                headers.insert("x-authz-reason", HeaderValue::from_static("no"));
                return Verdict::Deny {
                    status: StatusCode::UNAUTHORIZED,
                    headers,
                    body: Bytes::from_static(b"go away"),
                    reason: "denied by external authorizer (401)".into(),
                };
            }
            let mut h = HeaderMap::new();
            h.insert("x-authz-user", HeaderValue::from_static("alice"));
            Verdict::Allow(h)
        }
    }

    const POLICIES: &str = r#"
extensionProviders:
  - name: http-authz
    envoyExtAuthzHttp: {service: authz.shop.svc.cluster.local, port: 8000}
authorizationPolicies:
  - metadata: {name: no-admin, namespace: shop}
    spec:
      targetRefs: [{kind: Service, group: "", name: reviews}]
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
  - metadata: {name: ext, namespace: shop}
    spec:
      targetRefs: [{kind: Service, name: reviews}]
      action: CUSTOM
      provider: {name: http-authz}
      rules: [{to: [{operation: {paths: ["/ext/*"]}}]}]
"#;

    type Outcome = (Result<HeaderMap, Local>, FakeAuthorizer, WaypointMetrics);

    async fn run(path: &str) -> Outcome {
        run_in(testing::model(POLICIES), path).await
    }

    async fn run_in(model: MeshModel, path: &str) -> Outcome {
        let metrics = testing::metrics();
        let authorizer = FakeAuthorizer::default();
        let phase = Authorize {
            model: &model,
            waypoint: ("shop", "waypoint"),
            authorizer: &authorizer,
            metrics: &metrics,
        };
        let req = Request::get(path).body(()).unwrap();
        let out = phase.check(&testing::conn(), "reviews", &req).await;
        (out, authorizer, metrics)
    }

    #[tokio::test]
    async fn deny_policies_answer_403_with_the_rbac_flag_and_are_counted() {
        let (out, authorizer, metrics) = run("/admin/users").await;
        let d = out.unwrap_err();
        assert_eq!(
            (d.status, d.flag),
            (StatusCode::FORBIDDEN, ResponseFlag::RbacDenied)
        );
        assert_eq!(&d.body[..], b"RBAC: access denied\n");
        assert!(authorizer.asked.lock().unwrap().is_empty());
        let labels = PolicyLabels {
            policy: "shop/no-admin".into(),
        };
        assert_eq!(metrics.denials.get_or_create(&labels).get(), 1);
    }

    #[tokio::test]
    async fn custom_policies_ask_their_provider_and_pass_its_headers_on() {
        let (out, authorizer, _) = run("/ext/ok?q=1").await;
        let headers = out.unwrap();
        assert_eq!(headers.get("x-authz-user").unwrap(), "alice");
        assert_eq!(
            authorizer.asked.lock().unwrap().as_slice(),
            [(
                "http-authz".to_string(),
                "/ext/ok?q=1".to_string(),
                "spiffe://cluster.local/ns/shop/sa/client".to_string()
            )]
        );
    }

    #[tokio::test]
    async fn an_authorizer_denial_is_its_own_answer() {
        let (out, _, metrics) = run("/ext/deny").await;
        let d = out.unwrap_err();
        assert_eq!(
            (d.status, d.flag),
            (StatusCode::UNAUTHORIZED, ResponseFlag::ExtAuthzDenied)
        );
        assert_eq!(&d.body[..], b"go away");
        assert_eq!(d.headers.get("x-authz-reason").unwrap(), "no");
        let labels = PolicyLabels {
            policy: "shop/ext".into(),
        };
        assert_eq!(metrics.denials.get_or_create(&labels).get(), 1);
    }

    #[tokio::test]
    async fn a_policy_naming_an_unknown_provider_denies() {
        // The provider left the mesh configuration after the policy was
        // accepted.
        let mut model = testing::model(POLICIES);
        model.extension_providers.clear();
        let (out, authorizer, _) = run_in(model, "/ext/x").await;
        let d = out.unwrap_err();
        assert_eq!(
            (d.status, d.flag),
            (StatusCode::FORBIDDEN, ResponseFlag::ExtAuthzDenied)
        );
        assert!(
            d.reason.contains("unknown extension provider"),
            "{}",
            d.reason
        );
        assert!(authorizer.asked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn requests_no_policy_covers_pass_without_asking_anyone() {
        let (out, authorizer, _) = run("/reviews/1").await;
        assert!(out.unwrap().is_empty());
        assert!(authorizer.asked.lock().unwrap().is_empty());
    }
}
