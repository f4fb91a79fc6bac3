//! Who is on the other end of a control connection, and whether they may
//! use it: root, the server's own user, or a member of `control_group`.
//!
//! The socket's mode (0600, or 0660 with a `control_group`) already keeps
//! others from connecting; this check holds even where the mode does not:
//! a process with CAP_DAC_OVERRIDE, or a socket file an operator loosened.

use crate::config::ControlGroup;
use std::fmt;
use std::os::unix::net::UnixStream;

/// The credentials the kernel recorded when the peer connected
/// (SO_PEERCRED: effective uid and gid, pid in our pid namespace, 0 when
/// the peer's is not visible from ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={} pid={}", self.uid, self.gid, self.pid)
    }
}

pub fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(Peer { uid: cred.uid(), gid: cred.gid(), pid: cred.pid() })
}

/// Who may use the control socket, fixed when the socket is bound (the
/// socket's mode and group are set from the same values then).
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    server_uid: u32,
    group: Option<ControlGroup>,
}

/// Why a peer was refused: for the log, with what was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub reason: String,
}

impl AccessPolicy {
    /// The policy of a server running as the current effective user.
    pub fn new(group: Option<ControlGroup>) -> AccessPolicy {
        AccessPolicy { server_uid: nix::unistd::geteuid().as_raw(), group }
    }

    pub fn group(&self) -> Option<&ControlGroup> {
        self.group.as_ref()
    }

    /// Allowed: uid 0, the server's uid, or a member of the control group
    /// (its primary gid, else its supplementary groups, read from
    /// /proc/PID/status only when needed).
    pub fn check(&self, peer: &Peer) -> Result<(), Denied> {
        self.check_with(peer, supplementary_groups)
    }

    /// [`check`](Self::check) with the source of supplementary groups
    /// given (tests).
    fn check_with(&self, peer: &Peer, groups_of: impl FnOnce(&Peer) -> Result<Vec<u32>, String>) -> Result<(), Denied> {
        if peer.uid == 0 || peer.uid == self.server_uid {
            return Ok(());
        }
        let Some(group) = &self.group else {
            return Err(Denied { reason: format!("not root, not the server's uid {}, and no control_group is configured", self.server_uid) });
        };
        if peer.gid == group.gid {
            return Ok(());
        }
        match groups_of(peer) {
            Ok(groups) if groups.contains(&group.gid) => Ok(()),
            Ok(_) => Err(Denied { reason: format!("not root, not the server's uid {}, not in control_group {group}", self.server_uid) }),
            Err(why) => Err(Denied { reason: format!("not root, not the server's uid {}, primary gid not control_group {group}, and its supplementary groups are unknown: {why}", self.server_uid) }),
        }
    }

    /// What the refused client is told: who may use the socket.
    pub fn refusal(&self, peer: &Peer) -> String {
        let who = match &self.group {
            Some(g) => format!("root, the server's user (uid {}) and members of its control_group {g} may", self.server_uid),
            None => format!("root and the server's user (uid {}) may (the server has no control_group)", self.server_uid),
        };
        format!("permission denied: uid {} (gid {}) may not control this server: only {who}", peer.uid, peer.gid)
    }
}

/// The supplementary groups of the peer's process, from /proc/PID/status.
/// SO_PEERCRED has none (SO_PEERGROUPS has no constant in `libc` for every
/// architecture). The pid is checked to still carry the credentials the
/// peer connected with: a process that exited and whose pid was reused,
/// or one that changed its ids since, yields an error (then only the uid
/// and primary gid count).
fn supplementary_groups(peer: &Peer) -> Result<Vec<u32>, String> {
    if peer.pid <= 0 {
        return Err("its pid is not visible from the server's pid namespace".into());
    }
    let path = format!("/proc/{}/status", peer.pid);
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_status(&status, peer).ok_or_else(|| format!("{path} no longer matches the connecting process (exited, or changed its ids)"))
}

/// `Groups:` of a /proc/PID/status text, if its effective uid and gid are
/// the peer's.
fn parse_status(status: &str, peer: &Peer) -> Option<Vec<u32>> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|rest| rest.split_whitespace().map(str::parse::<u32>).collect::<Result<Vec<_>, _>>());
    // Uid:/Gid: list real, effective, saved, filesystem ids.
    let effective = |name: &str| field(name)?.ok()?.get(1).copied();
    if effective("Uid:")? != peer.uid || effective("Gid:")? != peer.gid {
        return None;
    }
    field("Groups:")?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(group: Option<u32>) -> AccessPolicy {
        AccessPolicy { server_uid: 500, group: group.map(|gid| ControlGroup { name: "ops".into(), gid }) }
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { uid, gid, pid: 42 }
    }

    fn no_groups(_: &Peer) -> Result<Vec<u32>, String> {
        Ok(vec![])
    }

    #[test]
    fn root_and_the_servers_user_are_allowed_without_a_group() {
        assert_eq!(policy(None).check_with(&peer(0, 7), no_groups), Ok(()));
        assert_eq!(policy(None).check_with(&peer(500, 7), no_groups), Ok(()));
        let denied = policy(None).check_with(&peer(1000, 7), |_| Ok(vec![7])).unwrap_err();
        assert!(denied.reason.contains("no control_group"), "{denied:?}");
    }

    #[test]
    fn a_member_of_the_control_group_by_primary_or_supplementary_gid_is_allowed() {
        let p = policy(Some(77));
        assert_eq!(p.check_with(&peer(1000, 77), |_| panic!("primary gid suffices")), Ok(()));
        assert_eq!(p.check_with(&peer(1000, 7), |_| Ok(vec![5, 77])), Ok(()));
        let denied = p.check_with(&peer(1000, 7), |_| Ok(vec![5, 78])).unwrap_err();
        assert!(denied.reason.contains("not in control_group 'ops' (gid 77)"), "{denied:?}");
        let unknown = p.check_with(&peer(1000, 7), |_| Err("gone".into())).unwrap_err();
        assert!(unknown.reason.contains("unknown: gone"), "{unknown:?}");
    }

    #[test]
    fn proc_status_groups_count_only_while_the_ids_match() {
        let status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t7\t7\t7\t7\nGroups:\t5 77 \n";
        assert_eq!(parse_status(status, &peer(1000, 7)), Some(vec![5, 77]));
        assert_eq!(parse_status(status, &peer(1001, 7)), None);
        assert_eq!(parse_status(status, &peer(1000, 8)), None);
        assert_eq!(parse_status("Uid:\t1000\t1000\t1000\t1000\nGid:\t7\t7\t7\t7\nGroups:\t\n", &peer(1000, 7)), Some(vec![]));
    }

    #[test]
    fn the_groups_of_a_real_process_are_read_from_proc() {
        let me = Peer { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw(), pid: std::process::id() as i32 };
        let mut expected: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        let mut got = supplementary_groups(&me).unwrap();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
        assert!(supplementary_groups(&Peer { pid: 0, ..me }).is_err());
    }
}
