//! Text and JSON output of the client commands. Tables are comfy-table's,
//! borderless (one row per line, easy to grep).

use nbdvirt::api::{ExtentStatus, GenerationRecord, LegView, MigrationStatus, ReloadReport, Status, VolumeStatus};
use comfy_table::{presets, Cell, CellAlignment, Table};
use serde::Serialize;

/// `--json`: the answer as the server sent it (keys sorted, pretty).
pub fn json(value: &impl Serialize) {
    let v = serde_json::to_value(value).unwrap_or_default();
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// Bytes in the largest binary unit that divides them exactly.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while u < UNITS.len() - 1 && bytes >= 1024 << (10 * u) && (bytes >> (10 * (u + 1))) << (10 * (u + 1)) == bytes {
        u += 1;
    }
    format!("{}{}", bytes >> (10 * u), UNITS[u])
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    t
}

pub fn right(t: &mut Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn state_of(v: &VolumeStatus) -> String {
    if v.manual_pause {
        format!("{} (manual)", v.state)
    } else {
        v.state.clone()
    }
}

/// `a@0`, `b@1MiB (failed)`.
fn leg_of(l: &LegView) -> String {
    let at = if l.backend_offset == 0 { "0".into() } else { human(l.backend_offset) };
    match &l.state {
        Some(state) => format!("{}@{at} ({state})", l.backend),
        None => format!("{}@{at}", l.backend),
    }
}

/// `a @ 1MiB`, `zero`, `stripe c@0,d@0 chunk 64KiB`, `mirror a@0,b@0 region 1MiB`.
fn target_of(e: &ExtentStatus) -> String {
    match &e.forwarded {
        None => placement_of(e),
        Some(f) => {
            let to = f.to.as_deref().unwrap_or("(not connected)");
            let error = f.last_error.as_ref().map_or(String::new(), |m| format!(", last error: {m}"));
            format!("{} forwarded to {to} ({} connection{}, {} requests, {} failed{error})", placement_of(e), f.connections, if f.connections == 1 { "" } else { "s" }, f.requests, f.failed)
        }
    }
}

fn placement_of(e: &ExtentStatus) -> String {
    if matches!(e.layout.as_str(), "mirror" | "stripe") {
        let legs: Vec<String> = e.legs.iter().map(leg_of).collect();
        let mut s = format!("{} {}", e.layout, legs.join(","));
        if let Some(c) = e.chunk {
            s += &format!(" chunk {}", human(c));
        }
        if let Some(r) = e.region {
            s += &format!(" region {}", human(r));
        }
        return s;
    }
    match (&e.backend, e.backend_offset) {
        (Some(b), Some(off)) => format!("{b} @ {}", human(off)),
        (Some(b), None) => b.clone(),
        (None, _) => "zero".into(),
    }
}

pub fn status(s: &Status) {
    let mut t = table(&["VOLUME", "SIZE", "GENERATION", "STATE", "CONNECTIONS", "IN-FLIGHT", "HELD", "LAST SWAP"]);
    for v in &s.volumes {
        let swap = match (v.last_hold_us, v.last_drain_us) {
            (Some(h), Some(d)) => format!("hold {h} us, drain {d} us ({} swaps)", v.swaps),
            _ => "-".into(),
        };
        t.add_row(vec![
            v.name.clone(),
            human(v.size),
            v.generation.to_string(),
            state_of(v),
            v.connections.to_string(),
            v.in_flight.to_string(),
            v.held_requests.to_string(),
            swap,
        ]);
    }
    right(&mut t, &[1, 2, 4, 5, 6]);
    println!("{t}");
    for v in &s.volumes {
        println!("\nvolume {}:", v.name);
        let mut t = table(&["START", "LENGTH", "TARGET"]);
        for e in &v.extents {
            t.add_row(vec![human(e.start), format!("+{}", human(e.length)), target_of(e)]);
        }
        right(&mut t, &[0, 1]);
        println!("{t}");
        for r in &v.held_ranges {
            println!("  held: {} +{}", r.start, r.length);
        }
        if let Some(e) = &v.last_error {
            println!("  last error: {e}");
        }
    }
    println!();
    let mut t = table(&["BACKEND", "KIND", "PATH", "SIZE"]);
    for b in &s.backends {
        let path = b.path.as_ref().map_or_else(|| "(memory)".to_string(), |p| p.display().to_string());
        t.add_row(vec![b.name.clone(), b.kind.as_str().into(), path, human(b.size)]);
    }
    right(&mut t, &[3]);
    println!("{t}");
}

pub fn reload(r: &ReloadReport) {
    println!("reload applied");
    for (label, items) in [
        ("added", &r.added),
        ("removed", &r.removed),
        ("unchanged", &r.unchanged),
        ("backends opened", &r.backends_opened),
        ("backends closed", &r.backends_closed),
        ("needs restart", &r.needs_restart),
    ] {
        if !items.is_empty() {
            println!("  {label}: {}", items.join(", "));
        }
    }
    for s in &r.swapped {
        println!(
            "  swapped {}: generation {} -> {} (hold {} us, drain {} us, {} attempt(s))",
            s.volume, s.from_generation, s.generation, s.hold, s.drain, s.attempts
        );
    }
}

pub fn history(gens: &[GenerationRecord]) {
    let mut t = table(&["GENERATION", "REASON", "COMMITTED_AT", "EXTENTS"]);
    for g in gens {
        t.add_row(vec![Cell::new(g.generation), Cell::new(&g.reason), Cell::new(g.committed_at), Cell::new(g.extents.len())]);
    }
    right(&mut t, &[0, 2, 3]);
    println!("{t}");
}

pub fn migrations(jobs: &[MigrationStatus]) {
    let mut t = table(&["MIGRATION", "STATE", "COPIED", "DESTINATION", "REASON"]);
    for m in jobs {
        let pct = m.copied_bytes as f64 * 100.0 / m.total_bytes.max(1) as f64;
        t.add_row(vec![
            m.volume.clone(),
            // In a cluster: the node whose job copies.
            match &m.node {
                Some(node) => format!("{} ({node})", m.state.as_str()),
                None => m.state.as_str().into(),
            },
            format!("{}/{} ({pct:.1}%)", human(m.copied_bytes), human(m.total_bytes)),
            format!("{} @ {}", m.dest, m.dest_offset),
            m.reason.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

pub fn attached(list: &[nbdvirt::attach::DeviceStatus]) {
    for d in list.iter().filter(|d| d.connected) {
        println!("{}  {}  {}", d.device, d.size.map(human).unwrap_or_default(), d.backend.as_deref().unwrap_or("-"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_are_exact() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(4096), "4KiB");
        assert_eq!(human(8 << 20), "8MiB");
        assert_eq!(human(1536), "1536B");
        assert_eq!(human(3 << 30), "3GiB");
    }

    #[test]
    fn targets_show_their_layout() {
        let leg = |b: &str, off: u64, state: Option<&str>| LegView { backend: b.into(), backend_offset: off, state: state.map(Into::into) };
        let mut e = ExtentStatus {
            start: 0,
            length: 1 << 30,
            backend: Some("a".into()),
            backend_offset: Some(1 << 20),
            zero: false,
            layout: "linear".into(),
            legs: Vec::new(),
            chunk: None,
            region: None,
            forwarded: None,
        };
        assert_eq!(target_of(&e), "a @ 1MiB");
        e = ExtentStatus { backend: None, backend_offset: None, layout: "stripe".into(), legs: vec![leg("c", 0, None), leg("d", 0, None)], chunk: Some(65536), ..e };
        assert_eq!(target_of(&e), "stripe c@0,d@0 chunk 64KiB");
        e = ExtentStatus { layout: "mirror".into(), legs: vec![leg("a", 0, None), leg("b", 4096, Some("failed"))], chunk: None, region: Some(1 << 20), ..e };
        assert_eq!(target_of(&e), "mirror a@0,b@4KiB (failed) region 1MiB");
    }
}
