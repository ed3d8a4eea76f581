//! Compiles `proto/*.proto` with protox (pure Rust, no `protoc` needed) and prost-build.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/opamp.proto", "proto/anyvalue.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for the conformance test that compares our schema with the reference client's.
    std::fs::write(out.join("opamp.fds"), fds.encode_to_vec())?;
    prost_build::Config::new()
        .bytes(["."])
        .btree_map(["."])
        // Rarely set and large: boxed, so the messages handled on every heartbeat stay small
        // (ServerToAgent is moved a few times per reply; 1.6 KB with these inline).
        .boxed(".opamp.proto.ServerToAgent.connection_settings")
        .boxed(".opamp.proto.ServerToAgent.packages_available")
        .boxed(".opamp.proto.ServerToAgent.command")
        .boxed(".opamp.proto.AgentToServer.package_statuses")
        .boxed(".opamp.proto.AgentToServer.connection_settings_request")
        .compile_fds(fds)?;
    Ok(())
}
