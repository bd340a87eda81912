//! Istio `security.istio.io/v1` policy objects as they appear in a mesh file
//! (or, later, in the Kubernetes API): `AuthorizationPolicy` and
//! `PeerAuthentication`, with Istio's field names so users can paste their
//! existing YAML. Unknown fields are rejected: a misspelt rule field that was
//! silently ignored would widen access.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kubernetes-style object metadata: the parts policies need.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// When the object was created (RFC 3339, as Kubernetes writes it).
    /// Istio breaks ties between conflicting objects by age (the oldest
    /// wins), then by name; without it only the name decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The order in which Istio lets conflicting objects win: oldest first,
    /// then by name (an object without a timestamp counts as oldest).
    pub fn precedence(&self) -> (Option<&str>, &str) {
        (self.creation_timestamp.as_deref(), self.name.as_str())
    }
}

pub(crate) fn default_namespace() -> String {
    "default".to_string()
}

/// Selects workloads in the policy's namespace by label, like Istio's
/// `WorkloadSelector`. Absent means "every workload in scope".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// `selector: {}` (or `matchLabels: {}`): Istio reads it as no selector
    /// at all for PeerAuthentication scope (namespace- or mesh-wide).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty()
    }

    /// True when every label of the selector is present with the same value.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A Gateway API style reference, used by policies attached to a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Istio's annotation that makes an AuthorizationPolicy report what it
/// would decide instead of enforcing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `security.istio.io/v1` AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Set on the stand-in for a policy that could not be read (Kubernetes
    /// mode): why. The stand-in denies in the policy's scope (see
    /// [`crate::kube::translate`]); a mesh file cannot set this.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

impl AuthorizationPolicy {
    /// `namespace/name`, as policies are named in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// The value of `istio.io/dry-run`, read as Go's `strconv.ParseBool`
    /// reads it (as Istio does): `None` when absent, `Err` when it is not a
    /// boolean (Istio then enforces the policy, and so does Sluice).
    pub fn dry_run_annotation(&self) -> Option<Result<bool, String>> {
        self.metadata
            .annotations
            .get(DRY_RUN_ANNOTATION)
            .map(|v| match v.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(format!("{DRY_RUN_ANNOTATION}: {v:?} is not a boolean")),
            })
    }

    /// Evaluated and reported, never enforced: `istio.io/dry-run: "true"`
    /// on an ALLOW or DENY policy (Istio's dry run covers those two
    /// actions only; on others the annotation is ignored).
    pub fn is_dry_run(&self) -> bool {
        matches!(
            self.spec.action,
            AuthorizationAction::Allow | AuthorizationAction::Deny
        ) && matches!(self.dry_run_annotation(), Some(Ok(true)))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub action: AuthorizationAction,
    /// `CUSTOM` action's extension provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
    /// `None` (the field absent) and `Some(vec![])` differ in Istio: an ALLOW
    /// policy with no rules matches nothing; `rules: [{}]` matches everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Absent matches any source; an empty list is refused (as in Istio).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "non_empty"
    )]
    pub from: Vec<RuleFrom>,
    /// Absent matches any operation; an empty list is refused.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "non_empty"
    )]
    pub to: Vec<RuleTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A list that, when present, must hold something: `from: []` reads as
/// "match any source" in one tool and "match nothing" in another, so Istio
/// refuses it, and so does Sluice.
fn non_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = Vec::<T>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "must not be empty (leave the field out to match anything)",
        ));
    }
    Ok(v)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Source,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Operation,
}

/// Who a rule matches. Field names as in Istio's `Source`;
/// `remoteIpBlocks` and `requestPrincipals` (and their negations) are
/// L7-only: they come from request headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Kubernetes service accounts of the peer, `namespace/name` or just
    /// `name` (then in the policy's namespace), exact match only (Istio
    /// 1.25+).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What a rule matches. Field names as in Istio's `Operation`; `hosts`,
/// `methods` and `paths` are L7-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// An Istio `when` condition (`key` such as `source.ip`,
/// `destination.port`, `request.headers[x]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// `security.istio.io/v1` PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// Set on the stand-in for a policy that could not be read (Kubernetes
    /// mode): why. The stand-in is STRICT in the policy's scope and wins
    /// over readable policies of the same scope.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

impl PeerAuthentication {
    /// `namespace/name`, as policies are named in logs and metrics.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// A workload policy: a selector with at least one label. Without
    /// labels (`selector: {}`) Istio reads it as namespace- (or mesh-) wide.
    pub fn selects_workloads(&self) -> bool {
        self.spec.selector.as_ref().is_some_and(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Keys are port numbers (as strings in YAML, as in Istio).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}
