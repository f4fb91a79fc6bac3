//! One handshake case: the real `server::handshake::negotiate` on an
//! in-memory transport, its every reply checked against the model
//! (`expect.rs`), then the bytes after a successful GO through the
//! transmission checks (`transmission.rs`).

use super::expect::{End, Walker};
use super::fixture::fixture;
use super::setup::Setup;
use super::transmission;
use super::transport::{ScriptTransport, TlsOutcome};
use super::Violation;
use crate::server::counters::ServerCounters;
use crate::server::handshake::{negotiate, HandshakeCtx, Negotiated};
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// What a case did, for a driver that keeps inputs showing new behaviour.
#[derive(Debug, Default)]
pub struct Report {
    /// Hashes of (option, answer, state) and of how the case ended.
    pub features: Vec<u64>,
}

/// Runs one case (input format: `setup.rs`). `Err` is a bug in the server
/// (or in the model); a panic inside is one too.
pub fn run(input: &[u8]) -> Result<Report, Violation> {
    let fixture = fixture();
    let (setup, script) = Setup::parse(input);
    let security = setup.security(fixture);
    let stopping = AtomicBool::new(setup.stopping);
    let counters = ServerCounters::default();
    let ctx = HandshakeCtx { catalog: &fixture.catalog, security: &security, stopping: &stopping, counters: &counters, timeout: Duration::from_secs(1) };
    let mut who = setup.identity();
    let tls = if setup.tls_fails { TlsOutcome::Fail } else { TlsOutcome::Succeed(setup.tls_peer()) };
    let mut transport = ScriptTransport::new(script, setup.chunk, tls, setup.out_limit);
    let result = negotiate(&mut transport, &ctx, &mut who);
    if let Some(why) = &transport.runaway {
        return Err(Violation::new(format!("the handshake does not end: {why}")));
    }
    if transport.start_tls_calls > 1 {
        return Err(Violation::new("STARTTLS run twice on one connection"));
    }
    if who.tls != transport.tls_started_at.is_some() {
        return Err(Violation::new(format!("the client's identity says TLS {}, the transport {:?}", who.tls, transport.tls_started_at)));
    }
    let mut walker = Walker::new(&setup, script, &transport.out, transport.write_failed, transport.tls_started_at);
    let (end, consumed) = walker.walk()?;
    let mut report = Report { features: walker.features };
    if transport.consumed() != consumed {
        return Err(Violation::new(format!("the server read {} bytes of the script, the model {consumed} (ended {end:?})", transport.consumed())));
    }
    compare(&end, &result)?;
    if let Ok(Some(n)) = &result {
        transmission::requests(&script[consumed..], n, &mut report.features)?;
    }
    Ok(report)
}

/// The server's result against the model's.
fn compare(end: &End, result: &io::Result<Option<Negotiated>>) -> Result<(), Violation> {
    let same = match (end, result) {
        (End::Transmit(a), Ok(Some(n))) => {
            let meta: Vec<_> = n.meta.selected.iter().map(|(id, c)| (*id, c.wire_name())).collect();
            n.volume.name() == a.volume && n.read_only == a.read_only && n.structured == a.structured && n.flags == a.flags && meta == a.meta
        }
        (End::Closed, Ok(None)) => true,
        (End::Failed(kind), Err(e)) => e.kind() == *kind,
        (End::WriteFailed, Err(e)) => e.kind() == io::ErrorKind::BrokenPipe,
        _ => false,
    };
    if same {
        return Ok(());
    }
    let got = match result {
        Ok(Some(n)) => format!("transmission on '{}' (read-only {}, structured {}, flags {:#x}, meta {:?})", n.volume.name(), n.read_only, n.structured, n.flags, n.meta),
        Ok(None) => "closed".into(),
        Err(e) => format!("error {:?}: {e}", e.kind()),
    };
    Err(Violation::new(format!("the handshake ended with {got}; the model expects {end:?}")))
}
