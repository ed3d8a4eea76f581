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
    prost_build::Config::new().bytes(["."]).btree_map(["."]).compile_fds(fds)?;
    Ok(())
}
