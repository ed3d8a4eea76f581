//! One harness for the suites that run the operator on the local control plane: fresh
//! namespaces with our CRDs and an agent token Secret each, an operator managing them (as the
//! Helm chart's RBAC identity, ready before the test goes on), its addresses, waiting on status,
//! a restart on the same OpAMP address, and one operator at a time per test binary.
//!
//! ```ignore
//! let env = TestEnv::new("e2e-apply").with_token("tok-apply").start().await;
//! env.apply(&agent_config_yaml).await;
//! let agent = RunningAgent::spawn(env.ws_url(), Some(env.token.clone()), spec);
//! let s = env.status_where::<AgentConfig>("checkout", "applied", |s| s.applied_agents == 1).await;
//! env.stop().await;
//!
//! // Two tenants, a changed configuration, the namespaces without an operator:
//! TestEnv::new("sec-a").tenant("sec-b").operator(|c| c.fleet.max_agents_per_namespace = Some(3))
//! TestEnv::new("e2e-leader").prepare().await // -> Tenants (start operators of your own)
//! ```
use std::fmt::Debug;
use std::ops::Deref;
use std::time::Duration;

use kube::Resource;
use kube::api::DynamicObject;
use kube::core::NamespaceResourceScope;
use opamp_operator::api::{AgentConfig, AgentConfigStatus, CapabilitySlot, CapabilitySlotStatus};
use opamp_operator::fleet::AgentKey;
use opamp_operator::operator::{Operator, OperatorConfig};
use opamp_operator::protocol::Uid;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard};

use super::cluster::{TestNamespace, install_crds};
use super::operator::test_config;
use super::poll_until;

/// How long status waits take unless the builder says otherwise.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// One environment at a time in a test binary: operators watch and write status, collectors
/// and agents take the few cores there are. Held by every [`Tenants`] and [`TestEnv`].
static SERIAL: Mutex<()> = Mutex::const_new(());

/// An agent token Secret `name` (type `opamp.dev/agent-token`) holding `token`.
pub fn token_secret(name: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\ntype: opamp.dev/agent-token\nstringData: {{token: {token}}}\n"
    )
}

/// A custom resource with a status the tests wait on.
pub trait WithStatus:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned
{
    type Status: Debug;
    fn into_status(self) -> Option<Self::Status>;
}

impl WithStatus for AgentConfig {
    type Status = AgentConfigStatus;
    fn into_status(self) -> Option<AgentConfigStatus> {
        self.status
    }
}

impl WithStatus for CapabilitySlot {
    type Status = CapabilitySlotStatus;
    fn into_status(self) -> Option<CapabilitySlotStatus> {
        self.status
    }
}

/// A fresh namespace with our CRDs installed and the agent token Secret `agents`.
pub struct Tenant {
    pub ns: TestNamespace,
    /// The agents' token (`tok-<namespace>` unless given: namespaces of earlier runs never go
    /// away, so a unique token is never someone else's).
    pub token: String,
    deadline: Duration,
}

impl Tenant {
    async fn create(prefix: &str, token: Option<String>, deadline: Duration) -> Tenant {
        let ns = TestNamespace::new(prefix).await;
        install_crds(&ns.client).await;
        let token = token.unwrap_or_else(|| format!("tok-{}", ns.name));
        ns.apply_yaml(&token_secret("agents", &token))
            .await
            .unwrap_or_else(|e| panic!("cannot create the agent token Secret in {}: {e}", ns.name));
        Tenant { ns, token, deadline }
    }

    /// The fleet's key of this namespace's agent `uid`.
    pub fn key(&self, uid: Uid) -> AgentKey {
        AgentKey::new(self.ns.name.as_str(), uid)
    }

    /// Server-side applies YAML into the namespace; panics (showing the YAML) if refused.
    pub async fn apply(&self, yaml: &str) -> Vec<DynamicObject> {
        self.ns.apply_yaml(yaml).await.unwrap_or_else(|e| panic!("apply failed: {e}\n{yaml}"))
    }

    /// Waits until the status of the `K` named `name` satisfies `pred`; on timeout shows the
    /// last status seen.
    pub async fn status_where<K: WithStatus>(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&K::Status) -> bool,
    ) -> K::Status {
        self.status_where_or::<K>(name, what, pred, String::new).await
    }

    /// [`Tenant::status_where`], adding `context()` (logs, …) to the failure message.
    pub async fn status_where_or<K: WithStatus>(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&K::Status) -> bool,
        context: impl Fn() -> String,
    ) -> K::Status {
        let api = self.ns.api::<K>();
        poll_until(self.deadline, || async {
            match api.get(name).await.ok().and_then(K::into_status) {
                Some(s) if pred(&s) => Ok(s),
                last => Err(last),
            }
        })
        .await
        .unwrap_or_else(|last| {
            panic!(
                "timed out after {:?} waiting for {} {name}: {what}; last status: {last:#?}\n{}",
                self.deadline,
                K::kind(&()),
                context()
            )
        })
    }
}

/// A change to the operator's configuration.
type Tweak = Box<dyn FnOnce(&mut OperatorConfig) + Send>;

/// What a [`TestEnv`] is made of, built by [`TestEnv::new`].
pub struct TestEnvBuilder {
    tenants: Vec<(String, Option<String>)>,
    tweaks: Vec<Tweak>,
    deadline: Duration,
}

impl TestEnvBuilder {
    /// The first namespace's agent token (default `tok-<namespace>`).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.tenants[0].1 = Some(token.into());
        self
    }

    /// Another namespace (CRDs, its own token `tok-<namespace>`) the operator manages too.
    pub fn tenant(mut self, prefix: &str) -> Self {
        self.tenants.push((prefix.to_owned(), None));
        self
    }

    /// [`TestEnvBuilder::tenant`] with a given token.
    pub fn tenant_with_token(mut self, prefix: &str, token: impl Into<String>) -> Self {
        self.tenants.push((prefix.to_owned(), Some(token.into())));
        self
    }

    /// Changes the operator's configuration (after [`test_config`] and the namespaces).
    pub fn operator(mut self, tweak: impl FnOnce(&mut OperatorConfig) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// How long status waits take at the most (default 30 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The namespaces only, for a test that starts operators of its own (or none).
    pub async fn prepare(self) -> Tenants {
        let serial = SERIAL.lock().await;
        let mut list = Vec::new();
        for (prefix, token) in self.tenants {
            list.push(Tenant::create(&prefix, token, self.deadline).await);
        }
        Tenants { list, _serial: serial }
    }

    /// The namespaces, and an operator managing them, ready.
    pub async fn start(self) -> TestEnv {
        let tweaks = self.tweaks;
        let tenants = TestEnvBuilder { tweaks: Vec::new(), ..self }.prepare().await;
        let mut config = OperatorConfig { namespaces: Some(tenants.names()), ..test_config() };
        for tweak in tweaks {
            tweak(&mut config);
        }
        let op = super::operator::start(config.clone()).await;
        TestEnv { op, tenants, config }
    }
}

/// A test's namespaces, holding the harness's lock until dropped or cleaned up. Dereferences
/// to the first.
pub struct Tenants {
    list: Vec<Tenant>,
    _serial: MutexGuard<'static, ()>,
}

impl Deref for Tenants {
    type Target = Tenant;
    fn deref(&self) -> &Tenant {
        &self.list[0]
    }
}

impl Tenants {
    /// The `i`-th namespace, in the order the builder was given them (0: the first).
    pub fn tenant(&self, i: usize) -> &Tenant {
        &self.list[i]
    }

    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|t| t.ns.name.clone()).collect()
    }

    /// Deletes the namespaces (not waiting for them to go away).
    pub async fn cleanup(self) {
        for t in self.list {
            t.ns.cleanup().await;
        }
    }
}

/// Namespaces and an operator managing them. Dereferences to [`Tenants`] (and so to the first
/// namespace's [`Tenant`]: `env.ns`, `env.token`, `env.apply(…)`).
pub struct TestEnv {
    pub op: Operator,
    tenants: Tenants,
    config: OperatorConfig,
}

impl Deref for TestEnv {
    type Target = Tenants;
    fn deref(&self) -> &Tenants {
        &self.tenants
    }
}

impl TestEnv {
    /// A builder for an environment whose first namespace is `<prefix>-<random>`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(prefix: &str) -> TestEnvBuilder {
        TestEnvBuilder {
            tenants: vec![(prefix.to_owned(), None)],
            tweaks: Vec::new(),
            deadline: DEFAULT_DEADLINE,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/opamp", self.op.opamp_addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}/v1/opamp", self.op.opamp_addr)
    }

    /// `http://<API address><path>`.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.op.api_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.op.metrics_addr.expect("a metrics address"))
    }

    /// Stops the operator and starts one with the same configuration on the same OpAMP
    /// address (agents reconnect to it).
    pub async fn restart(self) -> TestEnv {
        let TestEnv { op, tenants, mut config } = self;
        config.opamp_addr = op.opamp_addr;
        op.stop().await;
        let op = super::operator::start(config.clone()).await;
        TestEnv { op, tenants, config }
    }

    /// Stops the operator and deletes the namespaces.
    pub async fn stop(self) {
        let TestEnv { op, tenants, .. } = self;
        op.stop().await;
        tenants.cleanup().await;
    }
}
