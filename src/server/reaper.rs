//! The server's housekeeping tick. Drops clients that are still haggling
//! after `handshake_timeout` (socket timeouts alone cannot: a client that
//! sends a byte now and then resets them forever), and lets the buffer
//! pool's cap follow use.

use super::counters::Limit;
use super::ServerState;
use crate::sync::lock;
use std::sync::atomic::Ordering;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(200);

pub(super) fn run(shared: &ServerState) {
    while !shared.stopping.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        super::buffers::tick();
        let limit = shared.security.load().handshake_timeout;
        let mut conns = lock(&shared.connections);
        for (id, c) in conns.iter_mut().filter(|(_, c)| c.export.is_none() && !c.reaped && c.accepted.elapsed() > limit) {
            c.reaped = true;
            shared.counters.trip(Limit::HandshakeTimeout);
            tracing::warn!(id, peer = %c.peer, "handshake not finished within handshake_timeout ({limit:?}); dropping the client");
            c.socket.shutdown();
        }
    }
}
