//! Requests that another cluster node forwards: it routed them with its
//! table of generation `stamp` (the `nbdvirt:generation=N` context its
//! connection selected), found their pieces on stores it cannot reach, and
//! sends the volume range here, where this node's own table places them.
//!
//! Why such a request is not held by this node's gate when its stamp is
//! not newer than our table: a cluster barrier holds the changed ranges on
//! *every* node, the forwarder included, and the forwarder's drain waits
//! for its in-flight requests, forwarded ones too. Were this node to park
//! them behind its own hold of the same barrier, the forwarder's drain
//! would wait for a request that waits for the decision that waits for
//! the drain: every barrier under forwarded load would time out. Letting
//! them run is safe: such a request was admitted by the forwarder before
//! it paused, and the barrier commits only after the forwarder has
//! drained, so it has finished here before any node swaps.
//!
//! A request stamped one generation *ahead* comes from a node that has
//! already swapped; it goes through the gate, so it waits for our swap
//! and runs on the same table. Stamps two or more apart mean one side
//! missed a whole barrier, which the lease fence should have stopped: the
//! connection is closed unanswered (the forwarder re-connects with its
//! current stamp or gives up), never served on a table the other side
//! does not share.

/// How a forwarded request enters this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Through the gate, like every other request (it may park).
    Gate,
    /// Registered with the gate (drains count it) but never parked.
    Now,
    /// Refused: the stamp is too far from this node's generation.
    Stale,
}

/// The admission of a request stamped `stamp` while this node's table of
/// the volume is at `generation`.
pub(super) fn admission(stamp: u64, generation: u64) -> Admission {
    if stamp.saturating_add(1) < generation || stamp > generation.saturating_add(1) {
        Admission::Stale
    } else if stamp > generation {
        Admission::Gate
    } else {
        Admission::Now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_runs_now_up_to_our_generation_waits_one_ahead_and_is_refused_further_off() {
        assert_eq!(admission(7, 7), Admission::Now);
        assert_eq!(admission(6, 7), Admission::Now, "in flight across our swap");
        assert_eq!(admission(8, 7), Admission::Gate, "the forwarder swapped first");
        assert_eq!(admission(5, 7), Admission::Stale);
        assert_eq!(admission(9, 7), Admission::Stale);
        assert_eq!(admission(0, 1), Admission::Now);
        assert_eq!(admission(u64::MAX, 1), Admission::Stale);
    }
}
