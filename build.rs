//! Compiles the protobuf messages in `proto/` with `protox` (a pure-Rust protobuf compiler), so
//! building snapsync needs no system `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto");
    let files = ["proto/snapsync.proto"];
    let fds = match protox::compile(files, ["proto"]) {
        Ok(fds) => fds,
        Err(err) => panic!("compiling proto/snapsync.proto: {err}"),
    };
    if let Err(err) = prost_build::Config::new().bytes(["."]).compile_fds(fds) {
        panic!("generating Rust code from proto/snapsync.proto: {err}");
    }
}
