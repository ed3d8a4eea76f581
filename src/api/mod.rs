//! The custom resources (group `opamp.dev`, version `v1alpha1`): what users declare, and the
//! status the operator writes back. Field doc comments become the schema descriptions users read
//! in `kubectl explain`.
mod agent_config;
mod capability_slot;
pub mod conditions;
mod selector;

pub use agent_config::*;
pub use capability_slot::*;
pub use selector::*;

use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "opamp.dev";
pub const VERSION: &str = "v1alpha1";
/// The type of the Secrets that hold agent tokens.
pub const AGENT_TOKEN_SECRET_TYPE: &str = "opamp.dev/agent-token";

/// A key in a ConfigMap or Secret of the same namespace.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// Name of the object, in the resource's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the object's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// The CustomResourceDefinitions, one YAML document each, as `opamp-operator crds` prints them.
pub fn crds() -> Vec<(&'static str, String)> {
    vec![
        ("agentconfigs.opamp.dev.yaml", serde_yaml::to_string(&AgentConfig::crd()).expect("CRDs serialize")),
        (
            "capabilityslots.opamp.dev.yaml",
            serde_yaml::to_string(&CapabilitySlot::crd()).expect("CRDs serialize"),
        ),
    ]
}
