//! Our protos against the reference implementation's: every message, field (name, number,
//! type, label), enum and value that opamp-go v0.23.0 knows must be identical in ours.
mod common;

use common::cluster::tool;

#[test]
fn our_schema_matches_opamp_go() {
    let dir = std::env::temp_dir().join(format!("opamp-fds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fds = dir.join("opamp.fds");
    std::fs::write(&fds, opamp_operator::proto::FILE_DESCRIPTOR_SET).unwrap();
    let out = std::process::Command::new(tool("opamp-protodump")).arg("-compare").arg(&fds).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "schema differs from opamp-go v0.23.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
