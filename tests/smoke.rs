//! The embedded default and the simplest round trip.
mod common;
use common::*;
use std::process::Command;

#[test]
fn serves_a_file_volume_to_qemu_io() {
    require("qemu-io", "qemu-utils");
    let server = TestServer::start(
        r#"
[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"

[[volume]]
name = "v"
[[volume.extent]]
start = 0
length = "64MiB"
backend = "a"
backend_offset = 0
"#,
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 4096 8192", &server.uri("v")]));
    assert_eq!(read_at(&server.path("a.img"), 4096, 8192), vec![0x5a; 8192]);
}
