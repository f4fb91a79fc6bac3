//! Pool volumes against the real binary with real clients: volumes of every
//! layout created from a pool of three files, written with qemu-io, found
//! again with their data after a restart and a reload; online growth seen
//! by new connections (nbdinfo); shrink refused over data; deletion; the
//! numbers of `pool status`; and each bad request's own exit code.

mod common;

use common::cli::*;
use common::nbd_client::MIB;
use common::script::Script;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// Pool `p` (class `fast`, 1 MiB chunks) over three 64 MiB files; config
/// volume `cfg` on a backend of its own.
const POOL: &str = r#"[[backend]]
name = "a"
path = "{dir}/a.img"
size = "64MiB"
[[backend]]
name = "b"
path = "{dir}/b.img"
size = "64MiB"
[[backend]]
name = "c"
path = "{dir}/c.img"
size = "64MiB"
[[backend]]
name = "other"
path = "{dir}/other.img"
size = "8MiB"

[[pool]]
name = "p"
class = "fast"
backends = ["a", "b", "c"]
chunk = "1MiB"

[[volume]]
name = "cfg"
[[volume.extent]]
length = "8MiB"
backend = "other"
"#;

/// Every layout, as (volume, extra `volume create` arguments, size in MiB).
const LAYOUTS: [(&str, &[&str], u64); 4] = [
    ("lin", &["--layout", "linear"], 8),
    ("str", &["--layout", "stripe:3"], 12),
    ("mir", &["--layout", "mirror:2"], 8),
    ("thin", &["--thin"], 16),
];

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    require("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.env("PATH", debian_path()).args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd);
    assert!(!out.contains("failed") && !out.contains("Pattern verification"), "qemu-io reported a failure:\n{out}");
    out
}

/// Writes MiB `i` of `volume` with pattern `seed + i` for each given MiB.
fn write_mibs(server: &TestServer, volume: &str, seed: u64, mibs: &[u64]) {
    let cmds: Vec<String> = mibs.iter().map(|i| format!("write -P {} {} 1M", (seed + i) % 250 + 1, i * MIB)).collect();
    qemu_io(&server.uri(volume), &cmds);
}

/// Checks MiB `i` of `volume` holds pattern `seed + i` (qemu-io `read -P`).
fn read_mibs(server: &TestServer, volume: &str, seed: u64, mibs: &[u64]) {
    let cmds: Vec<String> = mibs.iter().map(|i| format!("read -P {} {} 1M", (seed + i) % 250 + 1, i * MIB)).collect();
    qemu_io(&server.uri(volume), &cmds);
}

fn create(server: &TestServer, name: &str, extra: &[&str], mib: u64) -> Value {
    let size = format!("{mib}MiB");
    let mut args = vec!["volume", "create", name, "--size", &size, "--pool", "p", "--json"];
    args.extend_from_slice(extra);
    json(&cli_ok(server, &args))
}

fn pool_status(server: &TestServer) -> Value {
    let list = json(&cli_ok(server, &["pool", "status", "p", "--json"]));
    list["pools"][0].clone()
}

/// nbdinfo's size of `volume` on a new connection.
fn nbd_size(server: &TestServer, volume: &str) -> u64 {
    require("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new("nbdinfo").env("PATH", debian_path()).args(["--size", &server.uri(volume)]));
    out.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size printed {out:?}"))
}

fn exit_code(server: &TestServer, args: &[&str]) -> (i32, String) {
    let out = cli(server, args);
    (out.status.code().unwrap_or(-1), text(&out))
}

/// Allocated bytes add up: the pool's equals the sum of its volumes', and
/// its size is free + allocated.
fn assert_numbers_add_up(p: &Value) {
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no number {k} in {v}"));
    let volumes: u64 = p["volumes"].as_array().unwrap().iter().map(|v| n(v, "allocated")).sum();
    assert_eq!(n(p, "allocated"), volumes, "pool allocated != sum of its volumes': {p}");
    assert_eq!(n(p, "size"), n(p, "free") + n(p, "allocated"), "size != free + allocated: {p}");
    let chunks: u64 = p["stores"].as_array().unwrap().iter().map(|s| n(s, "chunks")).sum();
    assert_eq!(chunks * n(p, "chunk"), n(p, "size"), "stores' chunks do not make the pool's size: {p}");
}

#[test]
fn volumes_of_every_layout_keep_their_data_across_restart_and_reload() {
    let mut server = start(POOL);
    for (seed, (name, extra, mib)) in LAYOUTS.iter().enumerate() {
        let info = create(&server, name, extra, *mib);
        assert_eq!((info["name"].as_str(), info["size"].as_u64(), info["pool"].as_str()), (Some(*name), Some(mib * MIB), Some("p")), "{info}");
        // Exported at once; thin volumes take space only where written.
        let all: Vec<u64> = (0..*mib).collect();
        let written: Vec<u64> = if *name == "thin" { vec![0, 5, mib - 1] } else { all };
        write_mibs(&server, name, seed as u64 * 40, &written);
        read_mibs(&server, name, seed as u64 * 40, &written);
    }
    // A new mirror's copies start in sync: nothing was written to copy.
    let legs = vol(&server, "mir")["extents"].as_array().unwrap().iter().flat_map(|e| e["legs"].as_array().unwrap().clone()).collect::<Vec<_>>();
    assert!(legs.len() >= 2 && legs.iter().all(|l| l["state"] == "in_sync"), "{legs:?}");
    let thin = vol(&server, "thin");
    assert_eq!(thin["extents"][0]["layout"], "thin (pool p)", "{thin}");
    let p = pool_status(&server);
    assert_numbers_add_up(&p);
    // The human forms name every pool and volume.
    let text = cli_ok(&server, &["pool", "status"]);
    for name in ["p", "lin", "str", "mir", "thin", "stripe:3", "mirror:2"] {
        assert!(text.contains(name), "pool status does not show {name}:\n{text}");
    }
    let usage = json(&cli_ok(&server, &["pool", "usage", "--since", "1h", "--json"]));
    assert!(usage["since"].as_u64() < usage["until"].as_u64(), "{usage}");
    let billed: Vec<&str> = usage["volumes"].as_array().unwrap().iter().map(|v| v["volume"].as_str().unwrap()).collect();
    assert!(["lin", "str", "mir", "thin"].iter().all(|v| billed.contains(v)), "{usage}");
    let thin_info = p["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "thin").unwrap().clone();
    assert_eq!(thin_info["allocated"].as_u64(), Some(3 * MIB), "a thin volume holds only the chunks written: {thin_info}");
    let mirror = p["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "mir").unwrap().clone();
    assert_eq!(mirror["allocated"].as_u64(), Some(16 * MIB), "a mirror holds both copies: {mirror}");

    // A clean restart, then a kill -9 restart: every volume, every byte.
    assert!(server.stop().success());
    respawn(&mut server);
    server.kill();
    respawn(&mut server);
    for (seed, (name, _, mib)) in LAYOUTS.iter().enumerate() {
        let written: Vec<u64> = if *name == "thin" { vec![0, 5, mib - 1] } else { (0..*mib).collect() };
        read_mibs(&server, name, seed as u64 * 40, &written);
        assert_eq!(nbd_size(&server, name), mib * MIB);
    }
    // An unwritten thin chunk reads zeros.
    qemu_io(&server.uri("thin"), &["read -P 0 1M 1M".to_string()]);
    let check = json(&cli_ok(&server, &["pool", "check", "--json"]));
    assert_eq!(check["pools"][0]["errors"], serde_json::json!([]), "{check}");

    // A reload of the unchanged config keeps pool volumes.
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert_eq!(report["removed"], serde_json::json!([]), "{report}");
    read_mibs(&server, "lin", 0, &[0, 7]);

    // Deleted volumes return their space and stay deleted after a restart.
    let before = pool_status(&server);
    let gone = json(&cli_ok(&server, &["volume", "delete", "str", "--json"]));
    assert_eq!(gone["name"], "str");
    let after = pool_status(&server);
    assert_eq!(after["free"].as_u64().unwrap(), before["free"].as_u64().unwrap() + 12 * MIB, "{before}\n{after}");
    assert_numbers_add_up(&after);
    assert!(server.stop().success());
    respawn(&mut server);
    let status = poll_status(&server);
    let names: Vec<&str> = status["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cfg", "lin", "mir", "thin"], "{status}");
    let (code, out) = exit_code(&server, &["volume", "delete", "str"]);
    assert_eq!(code, 3, "{out}");
}

#[test]
fn every_layout_grows_online_and_new_connections_see_the_new_size() {
    let server = start(POOL);
    for (seed, (name, extra, mib)) in LAYOUTS.iter().enumerate() {
        let seed = seed as u64 * 40;
        create(&server, name, extra, *mib);
        write_mibs(&server, name, seed, &[0, mib - 1]);
        let grown = 2 * mib;
        let report = json(&cli_ok(&server, &["volume", "resize", name, "--size", &format!("{grown}MiB"), "--json"]));
        assert_eq!((report["old_size"].as_u64(), report["volume"]["size"].as_u64()), (Some(mib * MIB), Some(grown * MIB)), "{report}");
        assert_eq!(nbd_size(&server, name), grown * MIB, "{name}: a new connection sees the new size");
        assert_eq!(vol(&server, name)["size"].as_u64(), Some(grown * MIB));
        // The old data is where it was; the new tail takes writes.
        read_mibs(&server, name, seed, &[0, mib - 1]);
        write_mibs(&server, name, seed, &[grown - 1]);
        read_mibs(&server, name, seed, &[0, mib - 1, grown - 1]);
    }
    assert_numbers_add_up(&pool_status(&server));
    // A client connected across a resize is told it keeps the old size.
    let mut client = Script::start("holder", &server.uri("lin"), "print('open', flush=True)\nimport sys\nsys.stdin.readline()\n");
    client.expect("open", Duration::from_secs(30));
    let report = json(&cli_ok(&server, &["volume", "resize", "lin", "--size", "24MiB", "--json"]));
    let note = report["note"].as_str().unwrap_or_default();
    assert!(note.contains("1 connection(s)") && note.contains("re-attached"), "{report}");
    let quiet = json(&cli_ok(&server, &["volume", "resize", "str", "--size", "36MiB", "--json"]));
    assert!(quiet["note"].is_null(), "no client, nothing to say: {quiet}");
    drop(client);
}

#[test]
fn a_shrink_that_cuts_off_data_needs_force() {
    let server = start(POOL);
    create(&server, "lin", &[], 8);
    create(&server, "thin", &["--thin"], 8);
    // Nothing written past 4 MiB of `thin`: shrinking it needs no force.
    write_mibs(&server, "thin", 0, &[1]);
    cli_ok(&server, &["volume", "resize", "thin", "--size", "4MiB"]);
    assert_eq!(nbd_size(&server, "thin"), 4 * MIB);
    read_mibs(&server, "thin", 0, &[1]);
    // Data at 6 MiB of `lin`: refused, then forced.
    write_mibs(&server, "lin", 0, &[1, 6]);
    let (code, out) = exit_code(&server, &["volume", "resize", "lin", "--size", "4MiB"]);
    assert_eq!(code, 4, "a shrink over data is a conflict: {out}");
    assert!(out.contains("--force"), "{out}");
    assert_eq!(nbd_size(&server, "lin"), 8 * MIB, "a refused shrink changes nothing");
    let report = json(&cli_ok(&server, &["volume", "resize", "lin", "--size", "4MiB", "--force", "--json"]));
    assert_eq!(report["volume"]["size"].as_u64(), Some(4 * MIB), "{report}");
    assert_eq!(nbd_size(&server, "lin"), 4 * MIB);
    read_mibs(&server, "lin", 0, &[1]);
    // Striped and mirrored volumes shrink too (nothing written past the cut).
    create(&server, "str", &["--layout", "stripe:3"], 12);
    create(&server, "mir", &["--layout", "mirror:2"], 8);
    write_mibs(&server, "str", 0, &[0, 5]);
    write_mibs(&server, "mir", 0, &[0, 3]);
    cli_ok(&server, &["volume", "resize", "str", "--size", "6MiB"]);
    cli_ok(&server, &["volume", "resize", "mir", "--size", "4MiB"]);
    assert_eq!((nbd_size(&server, "str"), nbd_size(&server, "mir")), (6 * MIB, 4 * MIB));
    read_mibs(&server, "str", 0, &[0, 5]);
    read_mibs(&server, "mir", 0, &[0, 3]);
    let p = pool_status(&server);
    assert_numbers_add_up(&p);
    let allocated = |name: &str| p["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap()["allocated"].as_u64();
    assert_eq!((allocated("lin"), allocated("str"), allocated("mir")), (Some(4 * MIB), Some(6 * MIB), Some(8 * MIB)), "{p}");
}

#[test]
fn a_reload_adds_a_store_to_the_pool_and_keeps_its_volumes() {
    let server = start(POOL);
    create(&server, "lin", &[], 8);
    write_mibs(&server, "lin", 7, &[0, 7]);
    let before = pool_status(&server);
    let grown = POOL.replace("backends = [\"a\", \"b\", \"c\"]", "backends = [\"a\", \"b\", \"c\", \"d\"]")
        + "[[backend]]\nname = \"d\"\npath = \"{dir}/d.img\"\nsize = \"32MiB\"\n";
    rewrite_config(&server, &grown);
    cli_ok(&server, &["reload"]);
    let after = pool_status(&server);
    assert_eq!(after["size"].as_u64().unwrap(), before["size"].as_u64().unwrap() + 32 * MIB, "{after}");
    assert_numbers_add_up(&after);
    read_mibs(&server, "lin", 7, &[0, 7]);
    // A store holding a volume's chunks cannot leave the pool.
    create(&server, "wide", &["--layout", "stripe:4"], 8);
    rewrite_config(&server, POOL);
    let (code, out) = exit_code(&server, &["reload"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("backend 'd' cannot leave"), "the refusal names the store: {out}");
    assert_eq!(pool_status(&server)["size"], after["size"], "a refused reload changes nothing");
    read_mibs(&server, "lin", 7, &[0, 7]);
}

#[test]
fn bad_requests_each_have_their_own_exit_code() {
    let server = start(POOL);
    let cases: [(&[&str], i32, &str); 6] = [
        (&["volume", "create", "x", "--size", "4MiB", "--pool", "nosuch"], 3, "nosuch"),
        (&["volume", "create", "x", "--size", "4MiB", "--class", "slow"], 3, "slow"),
        (&["volume", "create", "x", "--size", "1536KiB", "--pool", "p"], 7, "chunk"),
        (&["volume", "create", "cfg", "--size", "4MiB", "--pool", "p"], 4, "cfg"),
        (&["volume", "create", "x", "--size", "1GiB", "--pool", "p"], 8, "too small"),
        (&["volume", "create", "x", "--size", "4MiB", "--pool", "p", "--layout", "raid5"], 7, "raid5"),
    ];
    for (args, want, names) in cases {
        let (code, out) = exit_code(&server, args);
        assert_eq!(code, want, "nbdvirt {args:?}: {out}");
        assert!(out.contains(names), "nbdvirt {args:?} should name {names:?}: {out}");
    }
    assert_eq!(exit_code(&server, &["pool", "usage", "--since", "yesterday"]).0, 7);
    // A thin volume may be larger than the pool (overcommit).
    cli_ok(&server, &["volume", "create", "big", "--size", "1GiB", "--pool", "p", "--thin"]);
    // Pool volume names are taken for config volumes and other pool volumes.
    let (code, out) = exit_code(&server, &["volume", "create", "big", "--size", "4MiB", "--class", "fast"]);
    assert_eq!(code, 4, "{out}");
    // Not a pool volume: nothing to delete or resize.
    assert_eq!(exit_code(&server, &["volume", "delete", "cfg"]).0, 3);
    assert_eq!(exit_code(&server, &["volume", "resize", "nosuch", "--size", "4MiB"]).0, 3);
    assert_eq!(exit_code(&server, &["pool", "status", "nosuch"]).0, 3);

    // Delete while a client is connected: busy; --force disconnects it.
    create(&server, "used", &[], 4);
    let mut client = Script::start("holder", &server.uri("used"), "print('open', flush=True)\nimport sys\nsys.stdin.readline()\n");
    client.expect("open", Duration::from_secs(30));
    let (code, out) = exit_code(&server, &["volume", "delete", "used"]);
    assert_eq!(code, 4, "delete of a volume in use: {out}");
    assert!(out.contains("connection"), "{out}");
    assert_eq!(nbd_size(&server, "used"), 4 * MIB, "still exported");
    cli_ok(&server, &["volume", "delete", "used", "--force"]);
    let listed = poll_status(&server)["volumes"].as_array().unwrap().iter().any(|v| v["name"] == "used");
    assert!(!listed, "a deleted volume is not exported");
    drop(client);

    // A config volume may not map what the pool owns.
    let mut config = std::fs::read_to_string(&server.config).unwrap();
    config.push_str("\n[[volume]]\nname = \"grab\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"a\"\n");
    std::fs::write(&server.config, config).unwrap();
    let (code, out) = exit_code(&server, &["reload"]);
    assert_eq!(code, 4, "a config volume over pool space: {out}");
    assert!(out.contains("pool"), "{out}");
}

#[test]
fn a_config_volume_named_like_a_pool_volume_is_refused_by_reload_and_start() {
    let mut server = start(POOL);
    create(&server, "db", &[], 4);
    write_mibs(&server, "db", 3, &[0, 3]);
    let clash = format!("{POOL}[[backend]]\nname = \"extra\"\npath = \"{{dir}}/extra.img\"\nsize = \"4MiB\"\n[[volume]]\nname = \"db\"\n[[volume.extent]]\nlength = \"4MiB\"\nbackend = \"extra\"\n");
    rewrite_config(&server, &clash);
    let (code, out) = exit_code(&server, &["reload"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("'db' is a pool volume"), "{out}");
    read_mibs(&server, "db", 3, &[0, 3]);
    // At start neither may shadow the other: the server refuses, naming both.
    assert!(server.stop().success());
    let mut serve = Command::new(BIN);
    serve.args(["serve", "--config"]).arg(&server.config).env_remove("NBDVIRT_CONFIG");
    let out = run_timeout(&mut serve, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(stderr.contains("volume 'db'") && stderr.contains("pool 'p'"), "{stderr}");
    // Back to the old config: the pool volume and its data are there.
    rewrite_config(&server, POOL);
    respawn(&mut server);
    read_mibs(&server, "db", 3, &[0, 3]);
}
