//! The operator image (`make image`: the Dockerfile built by buildah), run by podman as a user
//! runs it: not root, read-only root file system, every capability dropped, no new privileges.
//! It prints its version, answers `/healthz` while it waits for the API server and `/readyz` once
//! it serves, and stops cleanly (exit 0) on SIGTERM.
//!
//! Ignored in `cargo test`: `make test-image` builds the image and runs them (`--ignored`).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::cluster::{cluster, install_crds};
use common::{eventually, within};

const T: Duration = Duration::from_secs(60);

fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/image")
}

/// The name `make image` gave the image (target/image/name).
fn image() -> String {
    let name = image_dir().join("name");
    std::fs::read_to_string(&name)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make image` first", name.display()))
        .trim()
        .to_string()
}

/// podman on the storage `make image` built into: no daemon, cgroupfs (there is no systemd), and
/// runc (crun refuses this machine's mix of cgroup v1 and v2 hierarchies).
fn podman(args: &[&str]) -> Output {
    let dir = image_dir();
    Command::new("podman")
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"])
        .args(["--runtime", "runc"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("podman runs (make image installs it)")
}

/// `podman run` and the limits to run with: podman's defaults lie above the hard limits here, and
/// root cannot raise them (no CAP_SYS_RESOURCE), so the open-file limit is this process's own.
fn podman_run(args: &[&str]) -> Output {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or("1024")
        .to_string();
    let nofile = format!("nofile={nofile}:{nofile}");
    podman(&[&["run", "--ulimit", &nofile, "--ulimit", "nproc=4096:4096"][..], args].concat())
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `podman run` with the restrictions the chart's security context sets.
const LOCKED_DOWN: &[&str] =
    &["--read-only", "--user", "65532:65532", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"];

#[test]
#[ignore = "needs the image: `make test-image` builds it and runs this"]
fn the_image_holds_only_the_operator_and_runs_it_as_non_root() {
    let image = image();
    let inspect =
        podman(&["image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}", &image]);
    assert!(inspect.status.success(), "podman image inspect: {}", text(&inspect));
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        r#"65532:65532 ["/opamp-operator","run"]"#,
        "the image runs `opamp-operator run` as 65532"
    );

    // `run --version`, through the entrypoint, with no shell or libc in the image.
    let version = podman_run(&[&["--rm", "--network", "none"], LOCKED_DOWN, &[&image, "--version"]].concat());
    assert!(version.status.success(), "--version: {}", text(&version));
    let printed = String::from_utf8_lossy(&version.stdout);
    assert!(printed.contains(env!("CARGO_PKG_VERSION")), "--version printed {printed:?}");

    // The binary and the CA bundle, nothing else: a shell or a libc would be attack surface. The archive
    // `make image` wrote (docker-archive) lists its layers in manifest.json.
    let archive = image_dir().join("opamp-operator.tar");
    let tar = |args: &[&str]| {
        let out = Command::new("tar").arg("-xOf").arg(&archive).args(args).output().expect("tar runs");
        assert!(out.status.success(), "tar {args:?}: {}", text(&out));
        out.stdout
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&tar(&["manifest.json"])).expect("manifest.json");
    assert_eq!(manifest[0]["RepoTags"][0], image.as_str(), "{manifest}");
    let layers = manifest[0]["Layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    let layer = image_dir().join("layer.tar");
    std::fs::write(&layer, tar(&[layers[0].as_str().unwrap()])).unwrap();
    let listed = Command::new("tar").arg("-tf").arg(&layer).output().expect("tar runs");
    let _ = std::fs::remove_file(&layer);
    let mut files: Vec<String> = String::from_utf8_lossy(&listed.stdout).lines().map(str::to_owned).collect();
    files.sort();
    assert_eq!(
        files,
        ["etc/", "etc/ssl/", "etc/ssl/certs/", "etc/ssl/certs/ca-certificates.crt", "opamp-operator"]
    );
    let ls = podman_run(&["--rm", "--network", "none", "--entrypoint", "/bin/sh", &image, "-c", "true"]);
    assert!(!ls.status.success(), "the image has no shell, yet /bin/sh ran: {}", text(&ls));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn status_of(url: &str) -> Option<u16> {
    reqwest::get(url).await.ok().map(|r| r.status().as_u16())
}

/// Removes the container when the test ends, passed or not.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.0]);
    }
}

#[tokio::test]
#[ignore = "needs the image: `make test-image` builds it and runs this"]
async fn the_image_serves_probes_against_the_api_server_and_exits_cleanly_on_sigterm() {
    let image = image();
    let info = cluster().await;
    install_crds(&info.client().await).await;

    // A kubeconfig the container can read on its own: the CA inline, the admin token.
    let dir = tempdir();
    let ca = std::fs::read(&info.ca_file).expect("cluster CA");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n\
             - name: local\n  context: {{cluster: local, user: admin}}\ncurrent-context: local\n",
            info.server,
            common::callback::b64encode(&ca),
            info.admin_token
        ),
    )
    .unwrap();
    std::fs::set_permissions(&kubeconfig, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let (opamp, api, metrics) = (free_port(), free_port(), free_port());
    let name = format!("opamp-image-test-{}", std::process::id());
    let mount = format!("{}:/etc/opamp/kubeconfig:ro", kubeconfig.display());
    let run = podman_run(
        &[
            &["--detach", "--name", &name, "--network", "host"][..],
            LOCKED_DOWN,
            &["--volume", &mount, "--env", "KUBECONFIG=/etc/opamp/kubeconfig", &image],
            &[
                &format!("--opamp-addr=127.0.0.1:{opamp}"),
                &format!("--api-addr=127.0.0.1:{api}"),
                &format!("--metrics-addr=127.0.0.1:{metrics}"),
                "--aggregated-api-addr=off",
            ],
        ]
        .concat(),
    );
    assert!(run.status.success(), "podman run: {}", text(&run));
    let container = Container(name);

    let logs = || text(&podman(&["logs", &container.0]));
    let healthz = format!("http://127.0.0.1:{api}/healthz");
    let readyz = format!("http://127.0.0.1:{api}/readyz");
    eventually(T, "/healthz answers 200", || async {
        (status_of(&healthz).await == Some(200)).then_some(())
    })
    .await;
    eventually(T, "/readyz answers 200 (the operator serves)", || async {
        (status_of(&readyz).await == Some(200)).then_some(())
    })
    .await;
    let scrape = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await.expect("metrics answer");
    assert_eq!(scrape.status(), 200, "metrics: {}", logs());

    // SIGTERM, as the kubelet sends it: the operator stops by itself, well within the pod's grace
    // period, with exit code 0 (not 143, not SIGKILL's 137).
    let kill = podman(&["kill", "--signal", "TERM", &container.0]);
    assert!(kill.status.success(), "podman kill: {}", text(&kill));
    let code = within(T, "the operator exits after SIGTERM", async {
        loop {
            let state =
                podman(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &container.0]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if let Some(code) = state.strip_prefix("exited ") {
                return code.to_string();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let logs = logs();
    assert_eq!(code, "0", "exit code after SIGTERM; logs:\n{logs}");
    assert!(!logs.contains("panicked"), "the operator panicked:\n{logs}");
    assert!(!logs.contains("Read-only file system"), "the operator tried to write a file:\n{logs}");
}

fn tempdir() -> PathBuf {
    let dir = image_dir().join(format!("test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
