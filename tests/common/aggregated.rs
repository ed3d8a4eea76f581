//! The aggregated API of a test operator, registered with the local control plane as a real
//! cluster has it: an `APIService` `v1alpha1.fleet.opamp.dev` whose Service is an ExternalName
//! `localhost` (the aggregator then calls `localhost:<port>`: there is no kube-proxy), with the
//! `caBundle` of a serving certificate made for `<service>.<namespace>.svc`.
//!
//! The APIService is cluster-wide: one operator at a time has it (the suites' tests run one at a
//! time, see `env::SERIAL`).
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use opamp_operator::agents_api::frontproxy::ServingFiles;
use opamp_operator::operator::AggregatedApiConfig;

use super::cluster::{apply_yaml, cluster};
use super::eventually;

pub const SERVICE: &str = "opamp-agents";
pub const API_SERVICE: &str = "v1alpha1.fleet.opamp.dev";

/// A serving certificate for `opamp-agents.<namespace>.svc`, and the CA that signed it (PEM).
pub struct Serving {
    pub files: ServingFiles,
    pub ca_pem: String,
}

/// Makes a CA and a serving certificate signed by it, in a temporary directory.
pub fn serving_certificate(namespace: &str) -> Serving {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "opamp-agents-test-ca");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names = vec![format!("{SERVICE}.{namespace}.svc"), "localhost".to_owned()];
    let leaf = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
    // A directory of its own: an operator reloads its certificate when the files change.
    let dir = std::env::temp_dir().join(format!("opamp-aggregated-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    Serving { files: ServingFiles { cert, key: key_file }, ca_pem: ca.pem() }
}

/// The aggregated API on a loopback port the OS picks, serving `serving`.
pub fn config(serving: &Serving) -> AggregatedApiConfig {
    AggregatedApiConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        files: Some(serving.files.clone()),
        names: vec!["localhost".into()],
    }
}

/// Points the APIService at `port` on loopback (through a Service in `namespace`) and waits
/// until the API server says it is available.
pub async fn register(namespace: &str, port: u16, ca_pem: &str) {
    let admin = cluster().await.client().await;
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {SERVICE}, namespace: {namespace}}}\n\
         spec: {{type: ExternalName, externalName: localhost}}\n"
    );
    apply_yaml(&admin, Some(namespace), &service).await.expect("the ExternalName Service");
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let api_service = format!(
        "apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: {API_SERVICE}}}\n\
         spec:\n  group: fleet.opamp.dev\n  version: v1alpha1\n  groupPriorityMinimum: 1000\n  versionPriority: 15\n\
         \x20 insecureSkipTLSVerify: false\n  caBundle: {ca}\n  service: {{namespace: {namespace}, name: {SERVICE}, port: {port}}}\n"
    );
    apply_yaml(&admin, None, &api_service).await.expect("the APIService");
    eventually(Duration::from_secs(60), "the APIService to be Available", || async {
        let out = cluster()
            .await
            .kubectl()
            .args(["get", "apiservice", API_SERVICE, "-o"])
            .arg("jsonpath={.spec.service.port} {.status.conditions[?(@.type==\"Available\")].status}")
            .output()
            .await
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == format!("{port} True")).then_some(())
    })
    .await;
}

/// Removes the APIService (the Service goes with its namespace).
pub async fn unregister() {
    let _ = cluster()
        .await
        .kubectl()
        .args(["delete", "apiservice", API_SERVICE, "--ignore-not-found"])
        .output()
        .await;
}

/// The local control plane's directory (certificates of the front proxy are there).
pub async fn cluster_dir() -> PathBuf {
    cluster().await.kubeconfig_path.parent().expect("the cluster's directory").to_path_buf()
}
