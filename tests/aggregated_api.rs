//! Agents in kubectl: the aggregated API `fleet.opamp.dev/v1alpha1` served by the operator
//! behind a real APIService on the local control plane, used the way a platform team does:
//! `kubectl get agents`, `-o wide`, `-A`, `-o yaml`, `describe`, `explain`, selectors, `-w`,
//! with the API server's RBAC deciding who sees which namespace.
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::aggregated::{self, cluster_dir};
use common::cluster::cluster;
use common::env::TestEnv;
use common::eventually;
use common::simrun::RunningAgent;
use opamp_operator::api::AgentConfig;
use opamp_operator::sim::AgentSpec;
use tokio::io::{AsyncBufReadExt, BufReader};

const T: Duration = Duration::from_secs(60);
/// The namespace of the APIService's ExternalName Service (its name is in the serving cert).
const SERVICE_NAMESPACE: &str = "default";

/// `kubectl ARGS` (as admin, or `--as=user`): exit success, stdout, stderr.
async fn kubectl(args: &[&str], user: Option<&str>) -> (bool, String, String) {
    let mut cmd = cluster().await.kubectl();
    cmd.args(args);
    if let Some(u) = user {
        cmd.arg(format!("--as={u}"));
    }
    let out = cmd.output().await.expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The kubectl output once `check` accepts it (an APIService just registered may take moments
/// to serve discovery to every client).
async fn kubectl_until(
    args: &[&str],
    user: Option<&str>,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    common::poll_until(T, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (ok, out, err) = kubectl(args, user).await;
        if ok && check(&out) { Ok(out) } else { Err(format!("{out}{err}")) }
    })
    .await
    .unwrap_or_else(|last| {
        panic!("timed out after {T:?} waiting for {what}; kubectl {args:?} printed last:\n{last}")
    })
}

/// `curl` straight to the operator's aggregated API port (not through the API server).
async fn curl(port: u16, path: &str, extra: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sk", "-o", "-", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

fn collector(service: &str, host: &str) -> AgentSpec {
    let mut spec = AgentSpec::new(service);
    spec.identifying.push(("service.version".into(), "1.4.2".into()));
    spec.non_identifying.push(("host.name".into(), host.into()));
    spec
}

#[tokio::test]
async fn kubectl_shows_agents_as_rbac_allows() {
    let serving = aggregated::serving_certificate(SERVICE_NAMESPACE);
    let agg = aggregated::config(&serving);
    let env =
        TestEnv::new("agg-a").tenant("agg-b").operator(move |c| c.aggregated_api = Some(agg)).start().await;
    let (a, b) = (env.tenant(0), env.tenant(1));
    let (na, nb) = (a.ns.name.clone(), b.ns.name.clone());
    let port = env.op.aggregated_api_addr.expect("the aggregated API is served").port();
    aggregated::register(SERVICE_NAMESPACE, port, &serving.ca_pem).await;

    // Two collectors of checkout in A (one fails its config), one of cart in B.
    let url = env.ws_url();
    let good = RunningAgent::spawn(url.clone(), Some(a.token.clone()), collector("checkout", "node-1"));
    let mut failing = collector("checkout", "node-2");
    failing.non_identifying.push(("fail".into(), "yes".into()));
    let failing = RunningAgent::spawn(url.clone(), Some(a.token.clone()), failing);
    let other = RunningAgent::spawn(url.clone(), Some(b.token.clone()), collector("cart", "node-3"));
    a.apply(
        "apiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {name: checkout}\nspec:\n  selector: {matchAttributes: {service.name: checkout}}\n  files: {collector.yaml: {inline: 'receivers: {}'}}\n---\napiVersion: opamp.dev/v1alpha1\nkind: AgentConfig\nmetadata: {name: broken}\nspec:\n  selector: {matchAttributes: {fail: 'yes'}}\n  files: {broken.yaml: {inline: 'FAIL_ME'}}\n",
    )
    .await;
    a.status_where::<AgentConfig>("checkout", "applied by the good agent", |s| s.applied_agents >= 1).await;
    let (good_uid, failing_uid, other_uid) =
        (good.uid.to_string(), failing.uid.to_string(), other.uid.to_string());

    // A team's viewer: agents in A only, granted like any resource.
    a.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: agent-viewer}\nrules: [{apiGroups: [fleet.opamp.dev], resources: [agents], verbs: [get, list, watch]}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: agent-viewer}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: agent-viewer}\nsubjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}]\n",
    )
    .await;

    // `kubectl get agents -n A` as alice: a table of A's agents, nothing of B's.
    let table = kubectl_until(&["get", "agents", "-n", &na], Some("alice"), "alice's table of A", |out| {
        out.contains(&good_uid)
            && out.contains(&failing_uid)
            && out.contains("APPLIED")
            && out.contains("FAILED")
    })
    .await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "SERVICE",
            "VERSION",
            "TRANSPORT",
            "CONNECTED",
            "HEALTHY",
            "CONFIG",
            "AGENTCONFIGS",
            "LAST",
            "SEEN"
        ],
        "{table}"
    );
    let good_row: Vec<&str> =
        table.lines().find(|l| l.starts_with(&good_uid)).unwrap().split_whitespace().collect();
    assert_eq!(
        &good_row[1..8],
        ["checkout", "1.4.2", "websocket", "true", "true", "APPLIED", "checkout"],
        "{table}"
    );
    let failing_row = table.lines().find(|l| l.starts_with(&failing_uid)).unwrap();
    assert!(failing_row.contains("FAILED") && failing_row.contains("broken,checkout"), "{table}");
    assert!(!table.contains(&other_uid), "B's agent in A's table: {table}");

    // B and all namespaces are forbidden to alice, by the API server's RBAC.
    let (ok, _, err) = kubectl(&["get", "agents", "-n", &nb], Some("alice")).await;
    assert!(!ok && err.contains("Forbidden") && err.contains(&nb), "{err}");
    let (ok, _, err) = kubectl(&["get", "agents", "-A"], Some("alice")).await;
    assert!(!ok && err.contains("Forbidden"), "{err}");
    let (ok, out, err) = kubectl(&["get", "agent", &other_uid, "-n", &nb, "-o", "yaml"], Some("alice")).await;
    assert!(!ok && !out.contains(&other_uid) && err.contains("Forbidden"), "{out}{err}");

    // Everyone's, to an admin, with the namespace column; -o wide adds the host.
    let all = kubectl_until(&["get", "agents", "-A"], None, "all agents", |out| {
        [&good_uid, &failing_uid, &other_uid].iter().all(|u| out.contains(u.as_str()))
    })
    .await;
    assert!(all.lines().next().unwrap().starts_with("NAMESPACE"), "{all}");
    assert!(all.lines().any(|l| l.starts_with(&nb) && l.contains(&other_uid) && l.contains("cart")), "{all}");
    let wide = kubectl(&["get", "agents", "-n", &na, "-o", "wide"], Some("alice")).await.1;
    assert!(wide.lines().next().unwrap().contains("HOST"), "{wide}");
    assert!(
        wide.lines().any(|l| l.starts_with(&good_uid) && l.contains("node-1") && l.contains("linux")),
        "{wide}"
    );

    // Selectors: labels are the attributes, fields the common questions.
    let by_label = kubectl(&["get", "agents", "-A", "-l", "service.name=cart", "-o", "name"], None).await.1;
    assert_eq!(by_label.trim(), format!("agent.fleet.opamp.dev/{other_uid}"));
    let failed = kubectl(
        &["get", "agents", "-n", &na, "--field-selector", "status.configStatus=FAILED", "-o", "name"],
        Some("alice"),
    )
    .await
    .1;
    assert_eq!(failed.trim(), format!("agent.fleet.opamp.dev/{failing_uid}"));
    let connected = kubectl(
        &[
            "get",
            "agents",
            "-A",
            "--field-selector",
            "status.connected=true,status.healthy=true",
            "-o",
            "name",
        ],
        None,
    )
    .await
    .1;
    assert_eq!(connected.lines().count(), 3, "{connected}");
    let (ok, _, err) = kubectl(&["get", "agents", "-A", "--field-selector", "spec.nodeName=x"], None).await;
    assert!(!ok && err.contains("field label not supported"), "{err}");

    // One agent in full.
    let yaml = kubectl(&["get", "agent", &failing_uid, "-n", &na, "-o", "yaml"], Some("alice")).await.1;
    let agent: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(agent["kind"], "Agent", "{yaml}");
    assert_eq!(agent["metadata"]["labels"]["service.name"], "checkout", "{yaml}");
    let status = &agent["status"];
    assert_eq!(status["config"]["status"], "FAILED", "{yaml}");
    assert_eq!(
        status["config"]["selectedBy"],
        serde_yaml::to_value(["broken", "checkout"]).unwrap(),
        "{yaml}"
    );
    assert_eq!(
        status["config"]["desiredFiles"],
        serde_yaml::to_value(["broken.yaml", "collector.yaml"]).unwrap()
    );
    assert!(status["config"]["desiredHash"].as_str().is_some_and(|h| h.len() == 64), "{yaml}");
    assert!(status["lastError"].as_str().is_some_and(|e| !e.is_empty()), "{yaml}");
    assert_eq!(status["nonIdentifyingAttributes"]["host.name"], "node-2");
    assert!(status["effectiveConfig"]["sizeBytes"].as_u64().is_some_and(|n| n > 0), "{yaml}");
    let described = kubectl(&["describe", "agent", &good_uid, "-n", &na], Some("alice")).await.1;
    assert!(
        described.contains(&good_uid) && described.contains("Selected By") && described.contains("checkout"),
        "{described}"
    );
    let (ok, _, err) =
        kubectl(&["get", "agent", "0193a5c4-0000-7000-8000-000000000000", "-n", &na], Some("alice")).await;
    assert!(!ok && (err.contains("NotFound") || err.contains("not found")), "{err}");

    // Read-only: what agents run is said by AgentConfigs.
    let (ok, _, err) = kubectl(&["delete", "agent", &good_uid, "-n", &na], None).await;
    assert!(!ok && err.contains("MethodNotAllowed") && err.contains("read-only"), "{err}");

    // kubectl explain reads the served OpenAPI.
    let explained =
        kubectl_until(&["explain", "agents.status.config"], None, "explain", |o| o.contains("selectedBy"))
            .await;
    assert!(explained.contains("KIND:") && explained.contains("Agent"), "{explained}");

    // Watch: the agent that stops is seen going offline.
    let mut watch = cluster().await.kubectl();
    watch
        .args(["get", "agents", "-n", &na, "-w", "--output-watch-events", "--as=alice"])
        .stdout(Stdio::piped());
    let mut child = watch.spawn().expect("kubectl watch");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The list comes first, then events: wait for the good agent's row before it stops.
    tokio::time::timeout(T, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&good_uid) {
                break;
            }
        }
    })
    .await
    .expect("the watch lists the agent");
    good.stop().await;
    let mut seen = Vec::new();
    let event = tokio::time::timeout(T, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(&good_uid) && line.starts_with("MODIFIED") && line.contains("false") {
                return Some(line);
            }
            seen.push(line);
        }
        None
    })
    .await;
    let event = match event {
        Ok(Some(line)) => line,
        _ => panic!("no MODIFIED event with the agent disconnected; the watch printed:\n{}", seen.join("\n")),
    };
    assert!(event.contains("<none>"), "offline: no transport: {event}");
    let _ = child.kill().await;

    // Straight to the operator's port, not through the API server: nothing.
    let agents = "/apis/fleet.opamp.dev/v1alpha1/agents";
    let (code, body) =
        curl(port, agents, &["-H", "X-Remote-User: admin", "-H", "X-Remote-Group: system:masters"]).await;
    assert_eq!(code, "401", "{body}");
    assert!(!body.contains(&other_uid), "{body}");
    // A client certificate of the front-proxy CA with a name the API server does not use.
    let dir = cluster_dir().await;
    let tmp = std::env::temp_dir().join(format!("agg-impostor-{na}"));
    std::fs::create_dir_all(&tmp).unwrap();
    let (key, crt) = (tmp.join("impostor.key"), tmp.join("impostor.crt"));
    let made = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl req -newkey rsa:2048 -nodes -subj /CN=impostor -keyout {k} -out {t}.csr 2>/dev/null && \
             printf 'extendedKeyUsage=clientAuth\\n' > {t}.ext && \
             openssl x509 -req -in {t}.csr -CA {d}/front-proxy-ca.crt -CAkey {d}/front-proxy-ca.key -CAcreateserial \
               -CAserial {t}.srl -extfile {t}.ext -days 1 -out {c} 2>/dev/null",
            k = key.display(),
            c = crt.display(),
            t = tmp.join("impostor").display(),
            d = dir.display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    let impostor = [
        "--cert",
        crt.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "-H",
        "X-Remote-User: admin",
        "-H",
        "X-Remote-Group: system:masters",
    ];
    let (code, body) = curl(port, agents, &impostor).await;
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("impostor") && !body.contains(&other_uid), "{body}");
    // Even the front proxy's own certificate gets only what the named user may see.
    let proxy_cert = dir.join("front-proxy-client.crt");
    let proxy_key = dir.join("front-proxy-client.key");
    let proxy = [
        "--cert",
        proxy_cert.to_str().unwrap(),
        "--key",
        proxy_key.to_str().unwrap(),
        "-H",
        "X-Remote-User: alice",
    ];
    let (code, body) =
        curl(port, &format!("/apis/fleet.opamp.dev/v1alpha1/namespaces/{nb}/agents"), &proxy).await;
    assert_eq!(code, "403", "{body}");
    assert!(!body.contains(&other_uid), "{body}");

    aggregated::unregister().await;
    for agent in [failing, other] {
        agent.stop().await;
    }
    env.stop().await;
}

/// With several replicas, whichever the API server reaches answers for every replica's agents.
#[tokio::test]
async fn every_replicas_agents_are_listed_by_any_replica() {
    let tenants = TestEnv::new("agg-rep").prepare().await;
    let ns = tenants.ns.name.clone();
    let peer = common::peers::identity(&ns).await;
    let serving = aggregated::serving_certificate(SERVICE_NAMESPACE);
    let mut ops = Vec::new();
    for name in ["agg-0", "agg-1"] {
        let mut config = common::peers::replica_config(&ns, vec![ns.clone()], name, &peer);
        config.aggregated_api = Some(aggregated::config(&serving));
        ops.push(common::operator::start(config).await);
    }
    common::peers::settled(&ops).await;
    let port = ops[0].aggregated_api_addr.expect("served").port();
    aggregated::register(SERVICE_NAMESPACE, port, &serving.ca_pem).await;
    let agents: Vec<RunningAgent> = ops
        .iter()
        .map(|op| {
            let url = format!("ws://{}/v1/opamp", op.opamp_addr);
            RunningAgent::spawn(url, Some(tenants.token.clone()), collector("checkout", "node"))
        })
        .collect();
    eventually(T, "one agent on each replica", || async {
        ops.iter().all(|op| op.fleet.connected_count() == 1).then_some(())
    })
    .await;
    let uids: Vec<String> = agents.iter().map(|a| a.uid.to_string()).collect();
    kubectl_until(&["get", "agents", "-n", &ns], None, "both replicas' agents", |out| {
        uids.iter().all(|u| out.lines().any(|l| l.starts_with(u.as_str()) && l.contains("true")))
    })
    .await;
    // The one on the other replica, by name and by selector.
    let yaml = kubectl(&["get", "agent", &uids[1], "-n", &ns, "-o", "yaml"], None).await.1;
    assert!(yaml.contains("connected: true"), "{yaml}");
    let named = kubectl(
        &[
            "get",
            "agents",
            "-n",
            &ns,
            "--field-selector",
            &format!("metadata.name={}", uids[1]),
            "-o",
            "name",
        ],
        None,
    )
    .await
    .1;
    assert_eq!(named.trim(), format!("agent.fleet.opamp.dev/{}", uids[1]));

    aggregated::unregister().await;
    for a in agents {
        a.stop().await;
    }
    for op in ops {
        op.stop().await;
    }
    tenants.cleanup().await;
}
