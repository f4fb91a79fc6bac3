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
            reap(shared, *id, c, limit);
        }
    }
}

/// A handshake read or write that ran into the socket timeout (set to
/// `handshake_timeout`) ends the same way as one the tick catches; whichever
/// comes first counts the trip, once.
pub(super) fn timed_out(shared: &ServerState, id: u64) {
    let limit = shared.security.load().handshake_timeout;
    if let Some(c) = lock(&shared.connections).get_mut(&id).filter(|c| !c.reaped) {
        reap(shared, id, c, limit);
    }
}

fn reap(shared: &ServerState, id: u64, c: &mut super::ConnEntry, limit: Duration) {
    c.reaped = true;
    shared.counters.trip(Limit::HandshakeTimeout);
    tracing::warn!(id, peer = %c.peer, "handshake not finished within handshake_timeout ({limit:?}); dropping the client");
    c.socket.shutdown();
}
