//! Request sizes at the edges, with the raw client: requests larger than
//! the advertised 32 MiB up to `server.max_request` (nbd's own integrity
//! test sends 47 MiB ones from an EXPORT_NAME client), requests above it,
//! and zero-length requests. Every refusal leaves the connection usable.
mod common;
use common::nbd_client::*;
use common::*;
use nbdvirt::nbd::{CMD_CACHE, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, INFO_BLOCK_SIZE, OPT_EXPORT_NAME, REP_INFO};

const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;
const SIZE: u64 = 128 * MIB;

const VOLUME: &str = r#"
[[backend]]
name = "m"
memory = true
size = "128MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "128MiB"
backend = "m"
"#;

fn start(server_keys: &str) -> TestServer {
    TestServer::start_with_server(server_keys, VOLUME)
}

/// An old-style client: NBD_OPT_EXPORT_NAME, so it never sees (or asks
/// for) block-size limits; simple replies.
fn export_name_client(server: &TestServer) -> Conn {
    let mut h = Handshake::start(server);
    h.send_option(OPT_EXPORT_NAME, b"v");
    let r = read_n(&mut h.s, 10, "EXPORT_NAME reply");
    assert_eq!(be64(&r), SIZE);
    Conn::new(h.s, false, SIZE, be16(&r[8..]))
}

/// A WRITE of `len` bytes the server must refuse: its payload is consumed
/// (the next request is framed right) and not applied.
fn refused_write(c: &mut Conn, len: u32, what: &str) {
    let before = c.read(0, 4096);
    let payload = vec![0xEE; len as usize];
    let o = c.request(0, CMD_WRITE, 0, len, &payload);
    assert_eq!(o.error, EINVAL, "{what}: {o:?}");
    assert_eq!(c.read(0, 4096), before, "{what}: the refused WRITE was applied");
    c.check_alive(len as u64);
}

#[test]
fn export_name_clients_may_send_up_to_max_request() {
    let server = start("");
    let mut c = export_name_client(&server);
    // 47 MiB, as nbd-tester-client's integrity test sends, in one request
    // each way, at an offset that is not a multiple of anything large.
    let off = 5 * MIB + 512;
    let data = pattern(47, 47 * MIB as usize);
    c.write(off, &data);
    assert!(c.read(off, data.len() as u32) == data, "47 MiB read back differs");
    // Exactly the default max_request (64 MiB) is served too.
    let o = c.request(0, CMD_READ, 0, 64 * MIB as u32, &[]);
    assert_eq!(o.error, 0);
    assert!(o.data[off as usize..off as usize + data.len()] == data[..]);
    // Above it: EINVAL (simple replies), the WRITE's payload discarded.
    let over = 64 * MIB as u32 + 4096;
    c.expect_error(0, CMD_READ, 0, over, &[], EINVAL, "READ above max_request");
    refused_write(&mut c, over, "WRITE above max_request");
}

#[test]
fn structured_clients_get_eoverflow_above_max_request_and_are_still_told_32mib() {
    let server = start("");
    let mut h = Handshake::start(&server);
    h.structured_reply();
    let r = h.exchange(nbdvirt::nbd::OPT_INFO, &info_payload("v", &[INFO_BLOCK_SIZE]));
    let bs = r.iter().find(|x| x.kind == REP_INFO && be16(&x.data) == INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(be32(&bs.data[10..]), 32 << 20, "advertised maximum block size");
    let mut c = h.go("v");
    let o = c.request(0, CMD_READ, 0, 40 * MIB as u32, &[]);
    assert_eq!((o.error, o.data.len()), (0, 40 * MIB as usize));
    c.expect_error(0, CMD_READ, 0, 64 * MIB as u32 + 1, &[], EOVERFLOW, "structured READ above max_request");
}

#[test]
fn max_request_is_configurable() {
    let server = start("max_inflight = \"96MiB\"\nmax_request = \"40MiB\"");
    let mut c = export_name_client(&server);
    let data = pattern(40, 40 * MIB as usize);
    c.write(MIB, &data);
    assert!(c.read(MIB, data.len() as u32) == data, "40 MiB read back differs");
    c.expect_error(0, CMD_READ, 0, 40 * MIB as u32 + 512, &[], EINVAL, "READ above the configured max_request");
    refused_write(&mut c, 40 * MIB as u32 + 512, "WRITE above the configured max_request");
}

#[test]
fn zero_length_requests_get_einval_and_the_connection_goes_on() {
    let server = start("");
    for structured in [false, true] {
        let mut c = open(&server, "v", structured);
        for (cmd, name) in [(CMD_READ, "READ"), (CMD_WRITE, "WRITE"), (CMD_TRIM, "TRIM"), (CMD_WRITE_ZEROES, "WRITE_ZEROES"), (CMD_CACHE, "CACHE")] {
            // At the start, inside, and at the very end of the export.
            for offset in [0, 8 * MIB + 17, SIZE] {
                let what = format!("{name} of length 0 at {offset} (structured: {structured})");
                c.expect_error(0, cmd, offset, 0, &[], EINVAL, &what);
            }
        }
    }
}
