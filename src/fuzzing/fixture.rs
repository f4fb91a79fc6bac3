//! The fixed world every handshake case runs against: six volumes over one
//! memory store, each with its own access rules, and the oracle saying who
//! may see and write which. Built once per process (building it per case
//! would dominate the run time and the per-case allocation count).
//!
//! The oracle is written out by hand, independently of `access.rs` and
//! `exports.rs`: it is what the harness checks the server against.

use crate::access::{ExportAccess, Rule};
use crate::backend::{open_backend, Backend, BackendSpec};
use crate::map::{Extent, MappingTable, TargetSpec};
use crate::tls::{TlsFiles, TlsServer};
use crate::volume::{Catalog, Translation, Volume, VolumeSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// Every volume of the fixture: name, size, read_only setting.
pub const VOLUMES: [(&str, u64, bool); 6] = [
    ("open", 1 << 20, false),
    ("ro", 1 << 20, true),
    ("alice", 1 << 20, false),
    ("tlsonly", 2 << 20, false),
    ("lan", 1 << 20, false),
    ("nobody", 1 << 20, false),
];

/// The default export (the empty name).
pub const DEFAULT: &str = "open";

/// Change trackers of `open`: more than a SET_META_CONTEXT may select
/// (`MAX_SELECTED`), so that limit is reachable.
pub const TRACKERS: usize = 40;

/// A description long enough that answering it many times in one reply
/// would show in the allocation bound (real descriptions can be long).
pub fn description(volume: &str) -> String {
    if volume == DEFAULT {
        format!("the open volume: {}", "lorem ipsum ".repeat(25))
    } else {
        String::new()
    }
}

pub fn tracker_name(i: usize) -> String {
    format!("split-{i}")
}

/// How the client is connected (before TLS adds to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// tcp 10.1.2.3 (inside `lan`'s 10.0.0.0/8)
    TcpLan,
    /// tcp 192.0.2.7
    TcpOther,
    /// Unix socket, uid 0 (`lan` allows it)
    UnixRoot,
    /// Unix socket, uid 1000
    UnixUser,
}

/// What a successful STARTTLS proves about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    PskAlice,
    PskBob,
    CertAlice,
    Anonymous,
}

/// Who the client is at some point of the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub origin: Origin,
    /// `Some` once TLS runs.
    pub tls: Option<Peer>,
}

/// Whether `who` may use `volume` at all (LIST shows it, GO may reach it):
/// the oracle for the fixture's `allow` and `tls_only` rules.
pub fn visible(volume: &str, who: Who) -> Visibility {
    let tls = who.tls.is_some();
    let allowed = match volume {
        "open" | "ro" | "tlsonly" => true,
        "alice" => matches!(who.tls, Some(Peer::PskAlice | Peer::CertAlice)),
        "lan" => matches!(who.origin, Origin::TcpLan | Origin::UnixRoot),
        _ => false,
    };
    match (allowed, volume) {
        (false, _) => Visibility::Unknown,
        (true, "tlsonly") if !tls => Visibility::NeedsTls,
        (true, _) => Visibility::Usable,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Usable,
    /// Allowed, but `tls_only` and TLS is not running.
    NeedsTls,
    /// Not allowed, or no such volume: answered exactly as unknown.
    Unknown,
}

/// Read-only for `who`: the volume's setting or its `read_only_for`.
pub fn read_only(volume: &str, who: Who) -> bool {
    volume == "ro" || (volume == "tlsonly" && who.tls == Some(Peer::PskBob))
}

/// The volume an export name resolves to, before any access rule.
pub fn resolve(name: &str) -> Option<&'static str> {
    let name = if name.is_empty() { DEFAULT } else { name };
    VOLUMES.iter().map(|v| v.0).find(|v| *v == name)
}

/// The shared, immutable part of every case.
pub struct Fixture {
    pub catalog: Catalog,
    /// Access rules by volume name (`Security::exports`).
    pub access: HashMap<String, ExportAccess>,
    /// Needed for STARTTLS to be offered at all; the harness's transport
    /// never runs a real TLS handshake with it.
    pub tls_server: Arc<TlsServer>,
}

/// The fixture, built on first use. Call it before measuring allocations.
/// Panics if the world cannot be built (no memfd, no temp dir): that is
/// the test machine, not the input.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| build().unwrap_or_else(|e| panic!("cannot build the fuzzing fixture: {e}")))
}

fn build() -> Result<Fixture, String> {
    let spec = BackendSpec { name: "fuzz".into(), path: None, size: Some(16 << 20), direct: false, read_only: false, delay: None, sharing: Default::default() };
    let store = open_backend(&spec).map_err(|e| e.to_string())?;
    let stores: HashMap<String, Arc<dyn Backend>> = HashMap::from([("fuzz".to_string(), store)]);
    let mut volumes = BTreeMap::new();
    let mut offset = 0;
    for (name, size, read_only) in VOLUMES {
        let target = TargetSpec::Linear { store: "fuzz".into(), offset };
        let table = MappingTable::new(1, vec![Extent { start: 0, length: size, target }]).map_err(|e| e.to_string())?;
        let translation = Translation::new(table, &stores).map_err(|e| e.to_string())?;
        let spec = VolumeSpec { name: name.into(), description: description(name), read_only, block_size: 4096 };
        volumes.insert(name.to_string(), Arc::new(Volume::new(spec, translation)));
        offset += size;
    }
    let open = &volumes[DEFAULT];
    for i in 0..TRACKERS {
        open.translation().redundancy().add_tracker(&tracker_name(i)).map_err(|e| e.to_string())?;
    }
    let rules = |list: &[&str]| list.iter().map(|r| r.parse::<Rule>().map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>();
    let access = HashMap::from([
        ("alice".to_string(), ExportAccess { allow: rules(&["psk:alice", "cert:CN=alice"])?, ..ExportAccess::default() }),
        ("tlsonly".to_string(), ExportAccess { tls_only: true, read_only_for: rules(&["psk:bob"])?, ..ExportAccess::default() }),
        ("lan".to_string(), ExportAccess { allow: rules(&["tcp:10.0.0.0/8", "unix:uid=0"])?, ..ExportAccess::default() }),
        ("nobody".to_string(), ExportAccess { allow: rules(&["psk:nobody"])?, ..ExportAccess::default() }),
    ]);
    let catalog = Catalog { stores, volumes, default_export: Some(DEFAULT.into()) };
    Ok(Fixture { catalog, access, tls_server: Arc::new(psk_server()?) })
}

/// A TLS context from a throwaway psktool file (the only way to build one;
/// it is loaded once and the file removed).
fn psk_server() -> Result<TlsServer, String> {
    let path = std::env::temp_dir().join(format!("nbdvirt-fuzz-{}.psk", std::process::id()));
    std::fs::write(&path, "alice:0123456789abcdef0123456789abcdef\n").map_err(|e| format!("{}: {e}", path.display()))?;
    let server = TlsServer::load(&TlsFiles { psk: Some(path.clone()), ..TlsFiles::default() });
    let _ = std::fs::remove_file(&path);
    server.map_err(|e| e.to_string())
}
