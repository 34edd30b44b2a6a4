//! Compiles proto/canopy.proto with protox (a pure-Rust protobuf compiler), so building
//! Canopy needs no protoc on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=canopy.proto");
    let fds = protox::compile(["canopy.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
