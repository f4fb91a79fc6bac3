//! What a scrape shows: the metric families, rendered from views the daemon
//! hands over at scrape time (its status, mirror and migration views, pool
//! views, and each volume's counters). Names and labels are a contract
//! (docs/ARCHITECTURE.md, issue 11): dashboards and alerts depend on them.

use super::text::{Exposition, Family};
use crate::api;
use crate::volume::{Op, StatsSnapshot, SwapResult};

/// One volume's counters as read at the scrape.
#[derive(Debug, Clone)]
pub struct VolumeCounters {
    pub volume: String,
    pub stats: StatsSnapshot,
}

/// Everything one scrape renders.
#[derive(Debug, Clone)]
pub struct Views {
    pub status: api::Status,
    pub counters: Vec<VolumeCounters>,
    pub mirrors: Vec<api::MirrorStatus>,
    pub migrations: Vec<api::MigrationStatus>,
    pub pools: Vec<api::PoolStatus>,
    /// Metering since the pools began (`pool usage` without `--since`).
    pub usage: Option<api::UsageReport>,
    /// Handshakes, access refusals and limit trips.
    pub server: crate::server::ServerCountersView,
    /// This node's view of its cluster (cluster mode only).
    pub cluster: Option<api::ClusterStatus>,
}

/// The `/metrics` body.
pub fn render(v: &Views) -> String {
    let mut e = Exposition::default();
    requests(&mut e, &v.counters);
    swaps(&mut e, &v.counters);
    volumes(&mut e, &v.status);
    mirrors(&mut e, &v.mirrors);
    migrations(&mut e, &v.migrations);
    pools(&mut e, &v.pools);
    usage(&mut e, &v.pools, v.usage.as_ref());
    guards(&mut e, &v.server);
    if let Some(c) = &v.cluster {
        super::cluster::membership(&mut e, c);
    }
    super::cluster::forwarding(&mut e, &v.status);
    e.finish()
}

fn guards(e: &mut Exposition, s: &crate::server::ServerCountersView) {
    let mut tls = Family::counter("nbdvirt_tls_handshakes_total", "TLS handshakes after NBD_OPT_STARTTLS, by result (ok or failed).");
    tls.sample(&[("result", "ok")], s.tls_ok);
    tls.sample(&[("result", "failed")], s.tls_failed);
    let mut denied = Family::counter("nbdvirt_access_denied_total", "Requests for an export the client's allow rules do not admit (answered as unknown).");
    denied.sample(&[], s.access_denied);
    let mut trips = Family::counter("nbdvirt_limit_trips_total", "Clients refused or dropped by a limit, by the limit's config key.");
    for (limit, n) in &s.limits {
        trips.sample(&[("limit", limit)], *n);
    }
    for f in [tls, denied, trips] {
        e.push(f);
    }
}

fn requests(e: &mut Exposition, counters: &[VolumeCounters]) {
    let mut total = Family::counter("nbdvirt_requests_total", "NBD requests answered, by command and result (ok or error).");
    let mut duration = Family::histogram("nbdvirt_request_duration_seconds", "Time from reading a request's header to queueing its reply.");
    let mut read = Family::counter("nbdvirt_read_bytes_total", "Bytes returned by successful reads.");
    let mut written = Family::counter("nbdvirt_written_bytes_total", "Bytes of successful writes.");
    let mut trimmed = Family::counter("nbdvirt_trimmed_bytes_total", "Bytes of successful trims.");
    let mut zeroed = Family::counter("nbdvirt_zeroed_bytes_total", "Bytes of successful write-zeroes.");
    let mut in_flight = Family::gauge("nbdvirt_requests_in_flight", "Requests read but not yet answered.");
    let mut connections = Family::gauge("nbdvirt_connections", "Open NBD connections to the volume.");
    for c in counters {
        let (volume, s) = (c.volume.as_str(), &c.stats);
        for (i, op) in Op::ALL.iter().enumerate() {
            let (ok, failed) = s.requests[i];
            total.sample(&[("volume", volume), ("op", op.name()), ("result", "ok")], ok);
            total.sample(&[("volume", volume), ("op", op.name()), ("result", "error")], failed);
            duration.observations(&[("volume", volume), ("op", op.name())], &s.latency[i]);
        }
        read.sample(&[("volume", volume)], s.read_bytes);
        written.sample(&[("volume", volume)], s.written_bytes);
        trimmed.sample(&[("volume", volume)], s.trimmed_bytes);
        zeroed.sample(&[("volume", volume)], s.zeroed_bytes);
        in_flight.sample(&[("volume", volume)], s.in_flight);
        connections.sample(&[("volume", volume)], s.connections);
    }
    for f in [total, duration, read, written, trimmed, zeroed, in_flight, connections] {
        e.push(f);
    }
}

fn swaps(e: &mut Exposition, counters: &[VolumeCounters]) {
    let mut total = Family::counter("nbdvirt_swaps_total", "Mapping-table swaps by result: ok, commit_failed, drain_timeout (after the last retry).");
    let mut hold = Family::histogram("nbdvirt_swap_hold_seconds", "How long a swap held its changed ranges (requests to them waited).");
    let mut drain = Family::histogram("nbdvirt_swap_drain_seconds", "How long a swap waited for in-flight requests on its ranges.");
    for c in counters {
        let volume = c.volume.as_str();
        for (i, r) in SwapResult::ALL.iter().enumerate() {
            total.sample(&[("volume", volume), ("result", r.name())], c.stats.swaps[i]);
        }
        hold.observations(&[("volume", volume)], &c.stats.swap_hold);
        drain.observations(&[("volume", volume)], &c.stats.swap_drain);
    }
    for f in [total, hold, drain] {
        e.push(f);
    }
}

fn volumes(e: &mut Exposition, status: &api::Status) {
    let mut generation = Family::gauge("nbdvirt_generation", "The mapping-table generation in force.");
    let mut size = Family::gauge("nbdvirt_volume_size_bytes", "The volume's size.");
    let mut paused = Family::gauge("nbdvirt_volume_paused", "1 while some range of the volume is held (swap or manual pause).");
    for v in &status.volumes {
        let l = [("volume", v.name.as_str())];
        generation.sample(&l, v.generation);
        size.sample(&l, v.size);
        paused.sample(&l, v.state != "running");
    }
    for f in [generation, size, paused] {
        e.push(f);
    }
}

/// Mirror leg states a leg is reported in (one-hot, so an alert can match
/// `state="failed"`); a state outside the list still gets its own series.
const LEG_STATES: [&str; 4] = ["in_sync", "resyncing", "failed", "split"];

fn mirrors(e: &mut Exposition, mirrors: &[api::MirrorStatus]) {
    let mut state = Family::gauge("nbdvirt_mirror_leg_state", "1 for the mirror leg's current state, 0 for the others.");
    let mut remaining = Family::gauge("nbdvirt_resync_remaining_bytes", "Bytes resync still has to copy to the leg.");
    let mut copied = Family::counter("nbdvirt_resync_copied_bytes_total", "Bytes resync copied to the leg since the daemon started.");
    let mut dirty = Family::gauge("nbdvirt_mirror_dirty_bytes", "Bytes of regions marked in the write-intent log.");
    for m in mirrors {
        let volume = m.volume.as_str();
        dirty.sample(&[("volume", volume)], m.dirty_bytes);
        for leg in &m.legs {
            let l = [("volume", volume), ("leg", leg.backend.as_str())];
            for s in LEG_STATES {
                state.sample(&[l[0], l[1], ("state", s)], leg.state == s);
            }
            if !LEG_STATES.contains(&leg.state.as_str()) {
                state.sample(&[l[0], l[1], ("state", leg.state.as_str())], 1u64);
            }
            remaining.sample(&l, leg.bytes_left);
            copied.sample(&l, leg.copied_bytes);
        }
    }
    for f in [state, remaining, copied, dirty] {
        e.push(f);
    }
}

fn migrations(e: &mut Exposition, jobs: &[api::MigrationStatus]) {
    let mut copied = Family::gauge("nbdvirt_migration_copied_bytes", "Bytes of the volume's latest migration copied so far.");
    let mut total = Family::gauge("nbdvirt_migration_total_bytes", "Bytes the volume's latest migration has to copy.");
    let mut state = Family::gauge("nbdvirt_migration_state", "1 for the state of the volume's latest migration, 0 for the others.");
    let states = [api::MigrationState::Running, api::MigrationState::Completed, api::MigrationState::Aborted, api::MigrationState::Failed];
    for j in jobs {
        let l = [("volume", j.volume.as_str())];
        copied.sample(&l, j.copied_bytes);
        total.sample(&l, j.total_bytes);
        for s in states {
            state.sample(&[l[0], ("state", s.as_str())], j.state == s);
        }
    }
    for f in [copied, total, state] {
        e.push(f);
    }
}

fn pools(e: &mut Exposition, pools: &[api::PoolStatus]) {
    let mut size = Family::gauge("nbdvirt_pool_size_bytes", "Bytes the pool's stores give it.");
    let mut allocated = Family::gauge("nbdvirt_pool_allocated_bytes", "Bytes of the pool's chunks held by volumes.");
    let mut free = Family::gauge("nbdvirt_pool_free_bytes", "Bytes of free chunks.");
    let mut reclaimable = Family::gauge("nbdvirt_pool_reclaimable_bytes", "Allocated bytes reclaim could take back (zero-only chunks, low-priority volumes).");
    let mut low_water = Family::gauge("nbdvirt_pool_low_water", "1 while free space is below the pool's low_water mark.");
    let mut overcommit = Family::gauge("nbdvirt_pool_overcommit_ratio", "Provisioned volume sizes over the pool's size.");
    let mut queued = Family::gauge("nbdvirt_pool_queued_writes", "Thin writes waiting for a free chunk.");
    let mut reclaimed = Family::counter("nbdvirt_pool_reclaimed_bytes_total", "Bytes reclaim took back since the daemon started.");
    for p in pools {
        let l = [("pool", p.name.as_str())];
        size.sample(&l, p.size);
        allocated.sample(&l, p.allocated);
        free.sample(&l, p.free);
        reclaimable.sample(&l, p.reclaimable);
        low_water.sample(&l, p.low_water);
        overcommit.sample(&l, p.overcommit);
        queued.sample(&l, p.queued_writes);
        reclaimed.sample(&l, p.reclaimed);
    }
    for f in [size, allocated, free, reclaimable, low_water, overcommit, queued, reclaimed] {
        e.push(f);
    }
}

/// Per pool volume: allocated and written bytes (from the pool views) and
/// the metered byte-seconds (from the usage report).
fn usage(e: &mut Exposition, pools: &[api::PoolStatus], usage: Option<&api::UsageReport>) {
    let mut allocated = Family::gauge("nbdvirt_volume_allocated_bytes", "Bytes of pool chunks the volume holds (all copies).");
    let mut written = Family::gauge("nbdvirt_volume_written_bytes", "Bytes clients have written to the pool volume since it was created.");
    let mut byte_seconds = Family::counter("nbdvirt_volume_allocation_byte_seconds_total", "Allocated bytes integrated over time, by billing rate.");
    for v in pools.iter().flat_map(|p| &p.volumes) {
        allocated.sample(&[("volume", v.name.as_str())], v.allocated);
        written.sample(&[("volume", v.name.as_str())], v.written);
    }
    for u in usage.iter().flat_map(|u| &u.volumes) {
        byte_seconds.sample(&[("volume", u.volume.as_str()), ("rate", u.rate.as_str())], u.allocation_byte_seconds);
    }
    for f in [allocated, written, byte_seconds] {
        e.push(f);
    }
}
