//! Every default setting, in one place: the config parser, the server's
//! and the swap's `Default`s, and the docs' reference all read these.

use std::time::Duration;

/// `server.listen` when the config names none.
pub const LISTEN: &str = "tcp:127.0.0.1:10809";
/// `server.state_dir`.
pub const STATE_DIR: &str = "/var/lib/nbdvirt";
/// Control socket file name inside the state directory (`server.control`).
pub const CONTROL_SOCKET: &str = "control.sock";
/// `server.io_threads`: threads for stores that may block.
pub const IO_THREADS: usize = 16;
/// `server.max_connections`.
pub const MAX_CONNECTIONS: usize = 256;
/// `server.max_inflight`: payload bytes in flight per connection.
pub const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// `server.max_request`: largest READ/WRITE accepted (nbd-server's and
/// nbdkit's limit; clients are told 32 MiB, `nbd::MAX_PAYLOAD`).
pub const MAX_REQUEST: u64 = 64 << 20;
/// Requests in flight per connection.
pub const MAX_INFLIGHT_REQUESTS: u64 = 1024;
/// `server.shutdown_grace`: ESHUTDOWN window after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// `server.busy_poll`: poll an idle connection at most this long before
/// sleeping (the window adapts below it, see `server::idle_poll`).
pub const BUSY_POLL: Duration = Duration::from_micros(50);
/// `server.handshake_timeout`: longest option haggling (TLS included);
/// a client still negotiating after it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.pause_timeout`: longest drain of a swap.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of `server.pause_timeout`: the Linux NBD client fails a
/// request after 30 s, so a pause must end well before that.
pub const PAUSE_TIMEOUT_MAX: Duration = Duration::from_secs(20);
/// `server.pause_retries`: further attempts after a drain timeout.
pub const PAUSE_RETRIES: u32 = 3;
/// Back-off before swap retry n is `SWAP_BACKOFF * n`.
pub const SWAP_BACKOFF: Duration = Duration::from_millis(200);
/// A manual pause's automatic end (`nbdvirt pause --timeout`).
pub const MANUAL_PAUSE: Duration = Duration::from_secs(30);
/// `server.max_option_payload`: largest option payload read during the
/// handshake (proto.md strings are at most 4 KiB; meta-context queries
/// may carry several).
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;
/// `server.max_export_name`: longest export name (proto.md's limit).
pub const MAX_EXPORT_NAME: usize = 4096;
/// `server.max_connections_per_address`: connections from one source
/// address (Unix-socket clients count as one address).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// `[cluster] lease_ttl`: how long etcd keeps a silent node's membership.
pub const CLUSTER_LEASE_TTL: Duration = Duration::from_secs(5);

/// `[cluster] failsafe`: how long past its lease a node serves on while
/// etcd does not answer but every peer does. Rides out an etcd leader
/// election or restart; a node that died delays the next cluster change
/// by its lease plus this.
pub const CLUSTER_FAILSAFE: Duration = Duration::from_secs(30);

/// `remote::RemoteOptions`: most connections a forwarding client keeps
/// open; it keeps one per two CPUs up to this (`forward_connections`).
pub const FORWARD_CONNECTIONS: usize = 4;

/// Connections a forwarding client keeps open here: one per two CPUs, at
/// most `FORWARD_CONNECTIONS`. Each connection is a reader thread here and
/// one on the serving node: on 2 CPUs forwarded 4k randread QD16 ran at
/// 58k IOPS with one connection, 55k with two, 50k with four
/// (docs/PERFORMANCE.md section 17).
pub fn forward_connections() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus / 2).clamp(1, FORWARD_CONNECTIONS)
}
/// Longest a forwarded request may take, resends and failover included:
/// a third of the Linux NBD client's 30 s, so that the client of the
/// forwarding node sees an error, not a dead connection.
pub const FORWARD_BOUND: Duration = Duration::from_secs(10);
/// Per connect attempt of a forwarding client (and per handshake read or
/// write): a dead node costs this much before the next candidate.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
