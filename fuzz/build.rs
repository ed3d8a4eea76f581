//! Sets `cfg(fuzzing)` on this crate whatever builds it (cargo-fuzz sets it for every crate):
//! the shared checks derive `Arbitrary` under it, so that `cargo clippy` on this crate alone
//! checks the targets as `cargo fuzz` builds them.
fn main() {
    println!("cargo:rustc-cfg=fuzzing");
}
