//! Who may use the control socket (issue 13): root, the server's own user
//! and members of `[server] control_group`; everyone else is refused with
//! `permission_denied` (exit 9), and every mutating command is logged with
//! the uid, gid and pid that sent it.
//!
//! Two layers refuse a stranger: the socket's mode (0600, or 0660 with the
//! group) and the server's check of the peer's credentials. To show the
//! second on its own, the stranger runs with CAP_DAC_OVERRIDE, which lets
//! a non-root process through the mode bits (as a capability-holding
//! service account would be). Needs root: it creates throwaway system
//! users and runs the CLI as them with setpriv.

mod common;

use common::cli::*;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const INVALID: i32 = 7;
const PERMISSION_DENIED: i32 = 9;

const GROUP: &str = "nbdvirt-ctltest";
const MEMBER: &str = "nbdvirt-ctltest-in";
const STRANGER: &str = "nbdvirt-ctltest-out";

/// One RAM volume: `pause v` / `resume v` are mutating and harmless.
const BODY: &str = r#"[[backend]]
name = "m"
memory = true
size = "4MiB"

[[volume]]
name = "v"
[[volume.extent]]
length = "4MiB"
backend = "m"
"#;

#[derive(Debug, Clone, Copy)]
struct Ids {
    uid: u32,
    gid: u32,
}

struct Users {
    group: u32,
    member: Ids,
    stranger: Ids,
}

/// A tool from /usr/sbin or PATH, or a failure naming its package.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("required tool `{name}` is missing: install the Debian package `{package}`"))
}

fn sh(cmd: &mut Command) -> String {
    run_ok(cmd).trim().to_string()
}

fn id(flag: &str, user: &str) -> u32 {
    sh(Command::new("id").args([flag, user])).parse().unwrap()
}

/// The group and the two users, created once per run if missing (system
/// accounts, no home). The member is in the group as a supplementary
/// group; the stranger is not in it.
fn users() -> &'static Users {
    static USERS: OnceLock<Users> = OnceLock::new();
    USERS.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests create system users and run commands as them: run them as root (scripts/test.sh does)");
        tool("setpriv", "util-linux");
        let getent = |db: &str, name: &str| Command::new("getent").args([db, name]).stdout(Stdio::null()).status().unwrap().success();
        if !getent("group", GROUP) {
            run_ok(Command::new(tool("groupadd", "passwd")).args(["--system", GROUP]));
        }
        for (user, groups) in [(MEMBER, Some(GROUP)), (STRANGER, None)] {
            if !getent("passwd", user) {
                let mut cmd = Command::new(tool("useradd", "passwd"));
                cmd.args(["--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]);
                if let Some(g) = groups {
                    cmd.args(["--groups", g]);
                }
                run_ok(cmd.arg(user));
            }
        }
        // Accounts left by an older run may have drifted.
        run_ok(Command::new(tool("usermod", "passwd")).args(["--append", "--groups", GROUP, MEMBER]));
        let stranger_groups = sh(Command::new("id").args(["-Gn", STRANGER]));
        if stranger_groups.split_whitespace().any(|g| g == GROUP) {
            run_ok(Command::new(tool("gpasswd", "passwd")).args(["--delete", STRANGER, GROUP]));
        }
        let group = sh(Command::new("getent").args(["group", GROUP])).split(':').nth(2).unwrap().parse().unwrap();
        let ids = |user: &str| Ids { uid: id("-u", user), gid: id("-g", user) };
        Users { group, member: ids(MEMBER), stranger: ids(STRANGER) }
    })
}

/// How the CLI is run.
#[derive(Clone, Copy)]
enum As {
    Root,
    /// The user with their groups from the group database.
    User(&'static str),
    /// The user with `gid` as primary group and no supplementary groups.
    UserWithGid(&'static str, u32),
    /// The user with their groups, plus CAP_DAC_OVERRIDE: past the
    /// socket's mode bits and every directory's, up to the server's check.
    UserPastModes(&'static str),
}

/// `nbdvirt ARGS --control SOCKET` run as `who`; its output and pid (setpriv
/// execs the CLI, so the pid the server sees is the child's).
fn cli_as(server: &TestServer, who: As, args: &[&str]) -> (Output, u32) {
    let mut cmd = match who {
        As::Root => Command::new(BIN),
        As::User(user) | As::UserPastModes(user) | As::UserWithGid(user, _) => {
            let mut cmd = Command::new(tool("setpriv", "util-linux"));
            cmd.arg(format!("--reuid={}", id("-u", user)));
            match who {
                As::UserWithGid(_, gid) => cmd.args([format!("--regid={gid}"), "--clear-groups".into()]),
                _ => cmd.args([format!("--regid={}", id("-g", user)), "--init-groups".into()]),
            };
            if matches!(who, As::UserPastModes(_)) {
                cmd.args(["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]);
            }
            cmd.arg(BIN);
            cmd
        }
    };
    cmd.args(args).arg("--control").arg(server.path("control.sock")).env_remove("NBDVIRT_CONFIG");
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "nbdvirt {args:?} did not finish within 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().unwrap(), pid)
}

/// Runs as `who`; must succeed. Returns the CLI's pid.
fn ok_as(server: &TestServer, who: As, args: &[&str]) -> u32 {
    let (out, pid) = cli_as(server, who, args);
    assert!(out.status.success(), "nbdvirt {args:?} failed: {}\n--- server log ---\n{}", text(&out), server.log());
    pid
}

/// Runs as `who`; must exit 9 with `needle` in stderr. Returns the pid.
fn refused_as(server: &TestServer, who: As, args: &[&str], needle: &str) -> u32 {
    let (out, pid) = cli_as(server, who, args);
    assert_eq!(out.status.code(), Some(PERMISSION_DENIED), "nbdvirt {args:?}: exit code\n{}\n--- server log ---\n{}", text(&out), server.log());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "nbdvirt {args:?}: stderr should contain {needle:?}\n{}", text(&out));
    pid
}

fn assert_logged(server: &TestServer, needle: &str) {
    // The line is written before the answer is sent; still, allow for the
    // log's buffering.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains(needle) {
        assert!(Instant::now() < deadline, "server log should contain {needle:?}:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server whose directory (holding the control socket) others may
/// search, so that only the socket's mode and the server's check decide.
fn open_dir_server(server_section: &str) -> TestServer {
    let mut server = TestServer::prepare(&format!("{server_section}\n\n{BODY}"));
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_searchable_by_all(server.dir.path());
    server.spawn();
    wait_control(&server);
    server
}

fn assert_searchable_by_all(dir: &Path) {
    for d in std::fs::canonicalize(dir).unwrap().ancestors() {
        let mode = std::fs::metadata(d).unwrap().mode();
        assert!(mode & 0o001 != 0, "{} (mode {mode:o}) must let other users through for this test: set TMPDIR to a directory that does", d.display());
    }
}

fn socket_mode_and_group(server: &TestServer) -> (u32, u32) {
    let meta = std::fs::metadata(server.path("control.sock")).unwrap();
    (meta.mode() & 0o777, meta.gid())
}

#[test]
fn root_is_served_and_its_mutating_commands_are_logged_with_its_ids() {
    let server = start(BODY);
    assert_eq!(socket_mode_and_group(&server).0, 0o600);
    ok_as(&server, As::Root, &["status"]);
    let pid = ok_as(&server, As::Root, &["pause", "v"]);
    assert_logged(&server, &format!("control: pause by uid=0 gid=0 pid={pid} request={{\"command\":\"pause\","));
    let line = server.log().lines().find(|l| l.contains(&format!("pid={pid} request="))).unwrap().to_string();
    assert!(line.contains("\"volume\":\"v\""), "the request's arguments are logged: {line}");
    let pid = ok_as(&server, As::Root, &["resume", "v"]);
    assert_logged(&server, &format!("control: resume by uid=0 gid=0 pid={pid}"));
    // A refused operation is logged with its outcome too.
    let (out, pid) = cli_as(&server, As::Root, &["resume", "v"]);
    assert!(!out.status.success(), "resume of a running volume: {}", text(&out));
    assert_logged(&server, &format!("control: resume by uid=0 gid=0 pid={pid} failed (conflict)"));
    // Queries are not logged.
    let log = server.log();
    assert!(!log.contains("control: status by"), "{log}");
}

#[test]
fn without_control_group_a_stranger_is_stopped_by_the_mode_and_by_the_credential_check() {
    let Users { stranger, .. } = users();
    let server = open_dir_server("");
    // The socket's mode 0600 refuses the connection itself.
    refused_as(&server, As::User(STRANGER), &["pause", "v"], "permission denied: cannot connect to the control socket");
    assert!(!server.log().contains("control: refused"), "the server never saw it:\n{}", server.log());
    // Past the mode bits, the server's own check refuses it, answers why
    // and logs who it was.
    let pid = refused_as(&server, As::UserPastModes(STRANGER), &["pause", "v"], &format!("permission denied: uid {} (gid {}) may not control this server", stranger.uid, stranger.gid));
    assert_logged(&server, &format!("control: refused pause from uid={} gid={} pid={pid}: not root, not the server's uid 0, and no control_group is configured", stranger.uid, stranger.gid));
    assert_eq!(vol(&server, "v")["state"], "running", "the refused pause must not have run");
    assert!(!server.log().contains("control: pause by"), "{}", server.log());
}

#[test]
fn control_group_members_are_served_and_everyone_else_refused() {
    let Users { group, member, stranger } = users();
    let server = open_dir_server(&format!("control_group = \"{GROUP}\""));
    assert_eq!(socket_mode_and_group(&server), (0o660, *group));
    assert!(!server.log().contains("cannot search"), "every directory lets the group through:\n{}", server.log());
    // A member through a supplementary group.
    let pid = ok_as(&server, As::User(MEMBER), &["pause", "v"]);
    assert_logged(&server, &format!("control: pause by uid={} gid={} pid={pid}", member.uid, member.gid));
    // A member through the primary group.
    let pid = ok_as(&server, As::UserWithGid(STRANGER, *group), &["resume", "v"]);
    assert_logged(&server, &format!("control: resume by uid={} gid={group} pid={pid}", stranger.uid));
    ok_as(&server, As::Root, &["status"]);
    // Not in the group: the mode 0660 refuses the connection, and past
    // it the server does, for queries as well.
    refused_as(&server, As::User(STRANGER), &["status"], "permission denied: cannot connect to the control socket");
    let pid = refused_as(&server, As::UserPastModes(STRANGER), &["status"], &format!("only root, the server's user (uid 0) and members of its control_group '{GROUP}' (gid {group}) may"));
    assert_logged(&server, &format!("control: refused status from uid={} gid={} pid={pid}: not root, not the server's uid 0, not in control_group '{GROUP}'", stranger.uid, stranger.gid));
}

#[test]
fn a_directory_that_keeps_the_group_out_is_named_at_start() {
    users();
    // A directory only root may search: members cannot reach the socket
    // inside it whatever the socket's mode.
    let mut server = TestServer::prepare(&format!("control_group = \"{GROUP}\"\n\n{BODY}"));
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    server.spawn();
    wait_control(&server);
    let dir = std::fs::canonicalize(server.dir.path()).unwrap();
    assert_logged(&server, &format!("control: members of control_group '{GROUP}' (gid {}) cannot search {} (mode 0700", users().group, dir.display()));
    refused_as(&server, As::User(MEMBER), &["status"], "permission denied: cannot connect to the control socket");
}

#[test]
fn a_server_running_as_a_user_serves_that_user_and_root() {
    let Users { member, stranger, .. } = users();
    let mut server = TestServer::prepare(BODY);
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_searchable_by_all(server.dir.path());
    chown_to(server.dir.path(), member);
    server.runner = vec![tool("setpriv", "util-linux").display().to_string(), format!("--reuid={}", member.uid), format!("--regid={}", member.gid), "--init-groups".into()];
    server.spawn();
    wait_control(&server);
    let meta = std::fs::metadata(server.path("control.sock")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (member.uid, 0o600));
    let pid = ok_as(&server, As::User(MEMBER), &["pause", "v"]);
    assert_logged(&server, &format!("control: pause by uid={} gid={} pid={pid}", member.uid, member.gid));
    let pid = ok_as(&server, As::Root, &["resume", "v"]);
    assert_logged(&server, &format!("control: resume by uid=0 gid=0 pid={pid}"));
    let pid = refused_as(&server, As::UserPastModes(STRANGER), &["status"], "only root and the server's user");
    assert_logged(&server, &format!("control: refused status from uid={} gid={} pid={pid}: not root, not the server's uid {}", stranger.uid, stranger.gid, member.uid));
}

#[test]
fn a_server_that_cannot_give_the_socket_to_its_group_does_not_start() {
    let Users { stranger, .. } = users();
    // The stranger is not in the group, so may not chown to it.
    let server = TestServer::prepare(&format!("control_group = \"{GROUP}\"\n\n{BODY}"));
    std::fs::set_permissions(server.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_searchable_by_all(server.dir.path());
    chown_to(server.dir.path(), stranger);
    let mut cmd = Command::new(tool("setpriv", "util-linux"));
    cmd.args([format!("--reuid={}", stranger.uid), format!("--regid={}", stranger.gid), "--init-groups".into()]).arg(BIN).arg("serve").arg("--config").arg(&server.config);
    let out = run_timeout(&mut cmd, Duration::from_secs(30));
    let expected = format!("cannot give {} to control_group '{GROUP}'", server.path("control.sock").display());
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expected), "should say {expected:?}: {}", text(&out));
    assert!(!server.path("control.sock").exists(), "no socket is left behind");
}

fn chown_to(path: &Path, to: &Ids) {
    std::os::unix::fs::chown(path, Some(to.uid), Some(to.gid)).unwrap();
}

#[test]
fn an_unknown_control_group_fails_the_config_load_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, format!("[server]\nstate_dir = \"{}\"\ncontrol_group = \"no-such-group-nbdvirt\"\n\n{BODY}", dir.path().display())).unwrap();
    let expected = format!("{}:3: server.control_group: no group named 'no-such-group-nbdvirt'", config.display());
    for args in [&["check", "--config"][..], &["serve", "--config"][..]] {
        let out = run_timeout(Command::new(BIN).args(args).arg(&config), Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(INVALID), "nbdvirt {args:?}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&expected), "nbdvirt {args:?} should say {expected:?}: {}", text(&out));
    }
}

#[test]
fn a_reload_that_changes_control_group_says_a_restart_is_needed_and_changes_nothing() {
    let Users { group, .. } = users();
    let server = open_dir_server("");
    let old = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, old.replacen("[server]\n", &format!("[server]\ncontrol_group = \"{GROUP}\"\n"), 1)).unwrap();
    let report = json(&cli_ok(&server, &["reload", "--json"]));
    assert!(report["needs_restart"].as_array().unwrap().iter().any(|f| f == "server.control_group"), "{report}");
    assert_eq!(socket_mode_and_group(&server).0, 0o600);
    // The group is not let in until a restart, by the mode nor by the check.
    refused_as(&server, As::UserWithGid(STRANGER, *group), &["status"], "permission denied: cannot connect");
    let pid = refused_as(&server, As::UserPastModes(MEMBER), &["status"], "only root and the server's user (uid 0) may (the server has no control_group)");
    let member = users().member;
    assert_logged(&server, &format!("control: refused status from uid={} gid={} pid={pid}: not root, not the server's uid 0, and no control_group is configured", member.uid, member.gid));
}
