//! Generates the admin API's messages, client and server from
//! `proto/wasmlet/admin/v1/admin.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wasmlet/admin/v1/admin.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure().compile_protos(&[proto], &["proto"])?;
    Ok(())
}
