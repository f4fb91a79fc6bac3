//! The `nbdvirt` command.

use clap::{Args, Parser, Subcommand};
use nbdvirt::config::{build_catalog, Config};
use nbdvirt::control::{client, protocol::RangeArg, protocol::Request, server::ControlServer};
use nbdvirt::daemon::Daemon;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where the CLI looks for a config when none is given.
const SYSTEM_CONFIG: &str = "/etc/nbdvirt/nbdvirt.toml";

#[derive(Parser)]
#[command(name = "nbdvirt", version, about = "Virtual block volumes as NBD exports, translated through live mapping tables")]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// How a client command finds the server.
#[derive(Args, Clone)]
struct Target {
    /// Control socket of the server (default: `control` from the config).
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// Config file whose `control` socket to use (default: $NBDVIRT_CONFIG,
    /// then /etc/nbdvirt/nbdvirt.toml, then the embedded default).
    #[arg(short, long, env = "NBDVIRT_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server in the foreground.
    Serve {
        /// Configuration file; without it the embedded default is served
        /// (a 1 GiB volume 'default' on a sparse file under ./nbdvirt-data).
        #[arg(short, long, env = "NBDVIRT_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Check a configuration file without serving it.
    Check {
        #[arg(short, long)]
        config: PathBuf,
        /// Also open every backend (creates missing files) and check sizes.
        #[arg(long)]
        open: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Show volumes (generation, state, extents, holds, I/O) and backends.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the server's config file and apply it under live I/O.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Remove volumes even if clients are connected (they are disconnected).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Hold a volume's I/O (e.g. around a snapshot); bounded by --timeout.
    Pause {
        volume: String,
        #[command(flatten)]
        target: Target,
        /// Only this range, START:LEN (sizes accept units, e.g. 0:1GiB).
        #[arg(long)]
        range: Option<String>,
        /// Resume automatically after this long (e.g. 30s).
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// End a manual pause.
    Resume {
        volume: String,
        #[command(flatten)]
        target: Target,
    },
    /// Move a volume (or a range of it) onto another backend, live.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Attach a volume as /dev/nbdN through the kernel NBD client.
    Attach {
        volume: String,
        /// Device to use (default: the first free one, printed).
        device: Option<String>,
        /// Server endpoint, unix:PATH or tcp:HOST:PORT (default: the config's
        /// first listen endpoint, preferring a Unix socket).
        #[arg(long)]
        connect: Option<String>,
        /// Connections to open (needs CAN_MULTI_CONN, which nbdvirt offers).
        #[arg(long, default_value_t = 1)]
        connections: u32,
        /// Request timeout in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Seconds the kernel holds I/O on a dead connection waiting for a
        /// reconnect (server restart).
        #[arg(long, default_value_t = 60)]
        dead_conn_timeout: u64,
        /// Logical block size given to the kernel (default: the server's preferred, max 4096).
        #[arg(long)]
        block_size: Option<u32>,
        /// Stay in the foreground and reconnect after server restarts.
        #[arg(long)]
        persist: bool,
        /// Use the ioctl interface (one connection; stays in the foreground).
        #[arg(long)]
        ioctl: bool,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Detach /dev/nbdN (or the device attached to VOLUME).
    Detach {
        /// /dev/nbdN or a volume name.
        device: String,
    },
    /// List NBD devices with their connection state and backend.
    Attached {
        #[arg(long)]
        json: bool,
    },
    /// List a volume's committed generations.
    History {
        volume: String,
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MigrateCommand {
    /// Start a migration.
    Start {
        volume: String,
        /// Destination BACKEND or BACKEND:OFFSET (default: lowest free range).
        #[arg(long)]
        to: String,
        /// Only this volume range, START:LEN.
        #[arg(long)]
        range: Option<String>,
        /// Copy bandwidth limit, bytes/s with units (e.g. 200MiB); 0 = unlimited. Default 64MiB.
        #[arg(long)]
        rate: Option<String>,
        /// Copy chunk size (default 1MiB).
        #[arg(long)]
        chunk: Option<String>,
        /// Punch holes in the source ranges after cutover.
        #[arg(long)]
        discard_source: bool,
        /// Wait for the end, showing progress.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show migrations (running and finished).
    Status {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a migration; the volume stays on its source.
    Abort {
        volume: String,
        #[command(flatten)]
        target: Target,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "nbdvirt=info",
        1 => "nbdvirt=debug",
        _ => "nbdvirt=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. } | Command::Attach { .. }) {
        // `nbdvirt status --json | head` should end quietly, not panic on EPIPE.
        // SAFETY: restoring the default disposition of SIGPIPE at start-up.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config, open } => check(&config, open),
        Command::DefaultConfig => {
            print!("{}", nbdvirt::config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Command::Status { target, json } => call(&target, &Request::Status).map(|v| {
            if json {
                print_json(&v)
            } else {
                print_status(&v)
            }
        }),
        Command::Reload { target, force, json } => call(&target, &Request::Reload { force }).map(|v| {
            if json {
                print_json(&v)
            } else {
                print_reload(&v)
            }
        }),
        Command::Pause { volume, target, range, timeout } => pause(&target, volume, range, &timeout),
        Command::Resume { volume, target } => call(&target, &Request::Resume { volume }).map(|v| println!("{}", v.as_str().unwrap_or(""))),
        Command::Migrate(cmd) => migrate(cmd),
        Command::Attach { volume, device, connect, connections, timeout, dead_conn_timeout, block_size, persist, ioctl, target, json } => {
            attach(volume, device, connect, connections, timeout, dead_conn_timeout, block_size, persist, ioctl, &target, json)
        }
        Command::Detach { device } => {
            let index = if device.starts_with("/dev/") { nbdvirt::attach::device_index(&device) } else { nbdvirt::attach::find_by_volume(&device) };
            index.and_then(|i| nbdvirt::attach::detach(i).map(|()| println!("/dev/nbd{i} detached"))).map_err(|e| e.to_string())
        }
        Command::Attached { json } => nbdvirt::attach::list().map_err(|e| e.to_string()).map(|list| {
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "devices": list })).unwrap_or_default());
            } else {
                for d in list.iter().filter(|d| d.connected) {
                    println!("{}  {}  {}", d.device, d.size.map(human).unwrap_or_default(), d.backend.as_deref().unwrap_or("-"));
                }
            }
        }),
        Command::History { volume, target, json } => call(&target, &Request::History { volume }).map(|v| {
            if json {
                print_json(&v)
            } else {
                for g in v.as_array().into_iter().flatten() {
                    println!("generation {:>4}  {:<28} committed_at={}  extents={}", g["generation"], g["reason"].as_str().unwrap_or(""), g["committed_at"], g["extents"].as_array().map_or(0, |a| a.len()));
                }
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nbdvirt: {message}");
            ExitCode::FAILURE
        }
    }
}

fn control_path(target: &Target) -> Result<PathBuf, String> {
    if let Some(p) = &target.control {
        return Ok(p.clone());
    }
    let path = match &target.config {
        Some(p) => p.clone(),
        None if Path::new(SYSTEM_CONFIG).exists() => PathBuf::from(SYSTEM_CONFIG),
        None => return Ok(Config::embedded_default().server.control),
    };
    match Config::load(&path) {
        Ok(config) => Ok(config.server.control),
        // A config being edited may be invalid; the server (running on the
        // previous one) must still be reachable, e.g. to see why a reload
        // failed. Only `[server] control` / `state_dir` are needed.
        Err(e) => nbdvirt::config::control_socket_of(&path).ok_or_else(|| format!("{e} (use --control to reach the server anyway)")),
    }
}

fn call(target: &Target, request: &Request) -> Result<Value, String> {
    // Reload and pause may wait for drains with retries; allow for that.
    client::call(&control_path(target)?, request, Duration::from_secs(300))
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 && (bytes >> (10 * (u + 1))) << (10 * (u + 1)) == bytes {
        v /= 1024.0;
        u += 1;
    }
    format!("{}{}", v, UNITS[u])
}

fn print_status(v: &Value) {
    for vol in v["volumes"].as_array().into_iter().flatten() {
        println!(
            "volume {}  size {}  generation {}  state {}{}  connections {}  in-flight {}  held {}",
            vol["name"].as_str().unwrap_or("?"),
            human(vol["size"].as_u64().unwrap_or(0)),
            vol["generation"],
            vol["state"].as_str().unwrap_or("?"),
            if vol["manual_pause"].as_bool() == Some(true) { " (manual)" } else { "" },
            vol["connections"],
            vol["in_flight"],
            vol["held_requests"],
        );
        for e in vol["extents"].as_array().into_iter().flatten() {
            let target = match e["backend"].as_str() {
                Some(b) => format!("{b} @ {}", human(e["backend_offset"].as_u64().unwrap_or(0))),
                None => "zero".into(),
            };
            println!("  {:>12} +{:<12} -> {target}", human(e["start"].as_u64().unwrap_or(0)), human(e["length"].as_u64().unwrap_or(0)));
        }
        for r in vol["held_ranges"].as_array().into_iter().flatten() {
            println!("  held: {} +{}", r["start"], r["length"]);
        }
        if let (Some(h), Some(d)) = (vol["last_hold_us"].as_u64(), vol["last_drain_us"].as_u64()) {
            println!("  last swap: hold {h} us, drain {d} us ({} swaps)", vol["swaps"]);
        }
        if let Some(e) = vol["last_error"].as_str() {
            println!("  last error: {e}");
        }
    }
    for b in v["backends"].as_array().into_iter().flatten() {
        println!(
            "backend {}  {}  {}  size {}",
            b["name"].as_str().unwrap_or("?"),
            b["kind"].as_str().unwrap_or("?"),
            b["path"].as_str().unwrap_or("(memory)"),
            human(b["size"].as_u64().unwrap_or(0))
        );
    }
}

fn print_reload(v: &Value) {
    let list = |k: &str| v[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    println!("reload applied");
    for (label, key) in [("added", "added"), ("removed", "removed"), ("unchanged", "unchanged"), ("backends opened", "backends_opened"), ("backends closed", "backends_closed"), ("needs restart", "needs_restart")] {
        let items = list(key);
        if !items.is_empty() {
            println!("  {label}: {items}");
        }
    }
    for s in v["swapped"].as_array().into_iter().flatten() {
        println!(
            "  swapped {}: generation {} -> {} (hold {} us, drain {} us, {} attempt(s))",
            s["volume"].as_str().unwrap_or("?"),
            s["from_generation"],
            s["generation"],
            s["hold"],
            s["drain"],
            s["attempts"]
        );
    }
}

fn pause(target: &Target, volume: String, range: Option<String>, timeout: &str) -> Result<(), String> {
    let timeout = nbdvirt::config::parse_duration(timeout).map_err(|e| format!("--timeout: {e}"))?;
    let range = range.map(|r| parse_range(&r, "--range")).transpose()?;
    let v = call(target, &Request::Pause { volume, range, timeout_ms: Some(timeout.as_millis() as u64) })?;
    println!("{}", v.as_str().unwrap_or(""));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attach(
    volume: String,
    device: Option<String>,
    connect: Option<String>,
    connections: u32,
    timeout: u64,
    dead_conn_timeout: u64,
    block_size: Option<u32>,
    persist: bool,
    ioctl: bool,
    target: &Target,
    json: bool,
) -> Result<(), String> {
    use nbdvirt::attach::{self, AttachOptions};
    use nbdvirt::endpoint::Endpoint;
    let endpoint: Endpoint = match connect {
        Some(c) => c.parse().map_err(|e| format!("--connect: {e}"))?,
        None => {
            let config = match &target.config {
                Some(p) => Config::load(p).map_err(|e| e.to_string())?,
                None if Path::new(SYSTEM_CONFIG).exists() => Config::load(Path::new(SYSTEM_CONFIG)).map_err(|e| e.to_string())?,
                None => Config::embedded_default(),
            };
            let listen = &config.server.listen;
            listen.iter().find(|e| matches!(e, Endpoint::Unix(_))).or(listen.first()).cloned().ok_or("the config has no listen endpoint")?
        }
    };
    let index = device.as_deref().map(attach::device_index).transpose().map_err(|e| e.to_string())?;
    let opts = AttachOptions { volume, index, endpoint, connections, timeout, dead_conn_timeout, block_size, force_ioctl: ioctl };
    let report = |a: &attach::Attached| {
        if json {
            println!("{}", serde_json::to_string(a).unwrap_or_default());
        } else {
            println!("{}", a.device);
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    };
    if ioctl || !attach::netlink_available() {
        if !ioctl {
            tracing::warn!("netlink 'nbd' family not available: falling back to the ioctl interface (stays in the foreground)");
        }
        return attach::attach_ioctl_blocking(&opts, report).map_err(|e| e.to_string());
    }
    let attached = attach::attach(&opts).map_err(|e| e.to_string())?;
    report(&attached);
    if persist {
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, stop.clone()).map_err(|e| e.to_string())?;
        }
        attach::watch(&opts, attached.index, || stop.load(Ordering::Relaxed)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parse_range(r: &str, what: &str) -> Result<RangeArg, String> {
    let (start, len) = r.split_once(':').ok_or_else(|| format!("{what} {r}: expected START:LEN"))?;
    let start = nbdvirt::config::parse_size(start).map_err(|e| format!("{what} start: {e}"))?;
    let length = nbdvirt::config::parse_size(len).map_err(|e| format!("{what} length: {e}"))?;
    Ok(RangeArg { start, length })
}

fn print_migrations(v: &Value) {
    for m in v["migrations"].as_array().into_iter().flatten() {
        let copied = m["copied_bytes"].as_u64().unwrap_or(0);
        let total = m["total_bytes"].as_u64().unwrap_or(0).max(1);
        println!(
            "migration {}  {}  {}/{} ({:.1}%)  -> {} @ {}{}",
            m["volume"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            human(copied),
            human(total),
            copied as f64 * 100.0 / total as f64,
            m["dest"].as_str().unwrap_or("?"),
            m["dest_offset"],
            m["reason"].as_str().map(|r| format!("  reason: {r}")).unwrap_or_default()
        );
    }
}

fn migrate(cmd: MigrateCommand) -> Result<(), String> {
    match cmd {
        MigrateCommand::Start { volume, to, range, rate, chunk, discard_source, wait, target } => {
            let (to, to_offset) = match to.split_once(':') {
                Some((b, off)) => (b.to_string(), Some(nbdvirt::config::parse_size(off).map_err(|e| format!("--to offset: {e}"))?)),
                None => (to, None),
            };
            let size = |s: Option<String>, what: &str| s.map(|s| nbdvirt::config::parse_size(&s).map_err(|e| format!("{what}: {e}"))).transpose();
            let request = Request::MigrateStart {
                volume: volume.clone(),
                to,
                to_offset,
                range: range.map(|r| parse_range(&r, "--range")).transpose()?,
                rate: size(rate, "--rate")?,
                chunk: size(chunk, "--chunk")?,
                discard_source,
            };
            let v = call(&target, &request)?;
            print_migrations(&v);
            if wait {
                wait_migration(&target, &volume)?;
            }
            Ok(())
        }
        MigrateCommand::Status { volume, json, target } => {
            let v = call(&target, &Request::MigrateStatus { volume })?;
            if json {
                print_json(&v)
            } else {
                print_migrations(&v)
            }
            Ok(())
        }
        MigrateCommand::Abort { volume, target } => {
            let v = call(&target, &Request::MigrateAbort { volume })?;
            print_migrations(&v);
            Ok(())
        }
    }
}

/// Follows a migration to its end: a progress bar on a terminal, progress
/// lines otherwise. Fails if the migration fails or is aborted.
fn wait_migration(target: &Target, volume: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
        );
        bar.set_message(format!("migrating {volume}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        let v = call(target, &Request::MigrateStatus { volume: Some(volume.to_string()) })?;
        let m = &v["migrations"][0];
        let copied = m["copied_bytes"].as_u64().unwrap_or(0);
        let total = m["total_bytes"].as_u64().unwrap_or(0);
        bar.set_length(total);
        bar.set_position(copied);
        let state = m["state"].as_str().unwrap_or("?").to_string();
        if !tty && (last_line.elapsed() >= Duration::from_secs(2) || state != "running") {
            eprintln!("migrate {volume}: {state} {}/{} bytes ({:.1}%)", copied, total, copied as f64 * 100.0 / total.max(1) as f64);
            last_line = std::time::Instant::now();
        }
        match state.as_str() {
            "running" => std::thread::sleep(Duration::from_millis(250)),
            "completed" => {
                bar.finish_with_message(format!("migrated {volume}"));
                println!("migration of '{volume}' completed: generation {}", m["generation"]);
                return Ok(());
            }
            other => {
                bar.abandon();
                return Err(format!("migration of '{volume}' {other}: {}", m["reason"].as_str().unwrap_or("no reason given")));
            }
        }
    }
}

fn check(path: &Path, open: bool) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    if open {
        build_catalog(&config).map_err(|e| e.to_string())?;
    }
    println!(
        "{}: ok ({} backend(s), {} volume(s): {})",
        path.display(),
        config.backends.len(),
        config.volumes.len(),
        config.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

fn serve(path: Option<PathBuf>) -> Result<(), String> {
    let config = match &path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => {
            tracing::info!("no --config given: serving the embedded default (volume 'default', 1 GiB sparse file in ./nbdvirt-data)");
            Config::embedded_default()
        }
    };
    // Test hook: abort at a given swap phase (crash-consistency tests).
    let crash_at = match std::env::var("NBDVIRT_TEST_CRASH_AT") {
        Ok(p) => Some(p.parse().map_err(|e| format!("NBDVIRT_TEST_CRASH_AT: {e}"))?),
        Err(_) => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone()).map_err(|e| format!("cannot install signal handler: {e}"))?;
    let daemon = Daemon::start(path, config, crash_at)?;
    let control = ControlServer::start(&daemon.control_path(), daemon.clone()).map_err(|e| format!("control socket: {e}"))?;
    daemon.start_serving();
    for volume in daemon.catalog().volumes.values() {
        tracing::info!(volume = volume.name(), size = volume.size(), generation = volume.generation(), extents = volume.table().extents().len(), "exporting");
    }
    let endpoints = daemon.endpoints();
    for endpoint in &endpoints {
        tracing::info!(%endpoint, "listening");
    }
    tracing::info!(control = %daemon.control_path().display(), "control socket ready");
    // A line on stdout for scripts and tests waiting for readiness.
    println!("nbdvirt: ready; listening on {}", endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", "));
    // systemd Type=notify: ready once listeners and control socket are up.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    while !stop.load(Ordering::Relaxed) {
        if reload.swap(false, Ordering::Relaxed) {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
            let result = daemon.reload(false);
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            match result {
                Ok(report) => tracing::info!(?report, "SIGHUP: reload applied"),
                Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stop requested: finishing in-flight requests");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    drop(control);
    daemon.shutdown().map_err(|e| format!("final flush failed: {e}"))
}
