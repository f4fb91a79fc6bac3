//! `mirror add|remove|readd|status`, `split`, `merge`.

use super::discover::{parse_range, parse_size};
use super::{other, render, CliResult, ServerAddress};
use clap::{Subcommand, ValueEnum};
use comfy_table::Cell;
use nbdvirt::api::{ApiError, ErrorKind, MergeKeep, MirrorList, MirrorStatus, PairReport, Request};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum MirrorCommand {
    /// Add a leg on another backend; it resyncs in the background.
    Add {
        volume: String,
        /// BACKEND or BACKEND:OFFSET (default: lowest free range).
        #[arg(long)]
        to: String,
        /// Only this volume range, START:LEN.
        #[arg(long)]
        range: Option<String>,
        /// Resync bandwidth limit, bytes/s with units; 0 = unlimited. Default 64MiB.
        #[arg(long)]
        rate: Option<String>,
        /// Wait until the leg is in sync, showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Drop a leg (refused for the last in-sync one unless --force).
    Remove {
        volume: String,
        #[arg(long)]
        leg: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Bring a failed leg back: only what it missed is copied.
    Readd {
        volume: String,
        #[arg(long)]
        leg: String,
        #[arg(long)]
        rate: Option<String>,
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Legs, their state, resync progress, dirty bytes.
    Status {
        volume: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
}

#[derive(Subcommand)]
pub enum PairCommand {
    /// Split an in-sync mirror leg off as a volume of its own (writable
    /// unless --read-only); both sides track their changes from then on.
    Split {
        volume: String,
        #[arg(long)]
        leg: String,
        #[arg(long = "as")]
        as_volume: String,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
    /// Rejoin a split copy, copying only what changed on either side.
    Merge {
        /// The split copy.
        volume: String,
        #[arg(long)]
        into: String,
        /// Which side's data wins (primary: the volume; secondary: the copy).
        #[arg(long, value_enum, default_value = "primary")]
        keep: Keep,
        /// Disconnect the split copy's clients first.
        #[arg(long)]
        force: bool,
        /// Resync bandwidth limit, bytes/s with units; 0 = unlimited. Default 64MiB.
        #[arg(long)]
        rate: Option<String>,
        /// Wait until every leg is in sync, showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerAddress,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Keep {
    Primary,
    Secondary,
}

pub fn run(cmd: MirrorCommand) -> CliResult {
    match cmd {
        MirrorCommand::Add { volume, to, range, rate, wait, json, server } => {
            let (to, to_offset) = match to.split_once(':') {
                Some((b, off)) => (b.to_string(), Some(parse_size(off, "--to offset")?)),
                None => (to, None),
            };
            let range = range.map(|r| parse_range(&r, "--range")).transpose()?;
            let rate = rate.map(|s| parse_size(&s, "--rate")).transpose()?;
            let request = Request::MirrorAdd { volume: volume.clone(), to: to.clone(), to_offset, range, rate };
            show(server.call(&request)?, json);
            if wait {
                wait_in_sync(&server, &volume, &to)?;
            }
        }
        MirrorCommand::Remove { volume, leg, force, json, server } => show(server.call(&Request::MirrorRemove { volume, leg, force })?, json),
        MirrorCommand::Readd { volume, leg, rate, wait, json, server } => {
            let rate = rate.map(|s| parse_size(&s, "--rate")).transpose()?;
            show(server.call(&Request::MirrorReadd { volume: volume.clone(), leg: leg.clone(), rate })?, json);
            if wait {
                wait_in_sync(&server, &volume, &leg)?;
            }
        }
        MirrorCommand::Status { volume, json, server } => show(server.call(&Request::MirrorStatus { volume })?, json),
    }
    Ok(())
}

pub fn run_pair(cmd: PairCommand) -> CliResult {
    let (report, json): (PairReport, bool) = match cmd {
        PairCommand::Split { volume, leg, as_volume, read_only, json, server } => (server.call(&Request::Split { volume, leg, as_volume, read_only })?, json),
        PairCommand::Merge { volume, into, keep, force, rate, wait, json, server } => {
            let keep = match keep {
                Keep::Primary => MergeKeep::Primary,
                Keep::Secondary => MergeKeep::Secondary,
            };
            let rate = rate.map(|s| parse_size(&s, "--rate")).transpose()?;
            let report: PairReport = server.call(&Request::Merge { volume, into: into.clone(), keep, force, rate })?;
            if wait {
                show_pair(&report, json);
                // The side that lost copies from the other.
                let list: MirrorList = server.call(&Request::MirrorStatus { volume: Some(into.clone()) })?;
                let copying: Vec<String> = list.mirrors.iter().flat_map(|m| &m.legs).filter(|l| l.state == "resyncing").map(|l| l.backend.clone()).collect();
                for leg in copying {
                    wait_in_sync(&server, &into, &leg)?;
                }
                return Ok(());
            }
            (report, json)
        }
    };
    show_pair(&report, json);
    Ok(())
}

fn show_pair(report: &PairReport, json: bool) {
    if json {
        render::json(report);
    } else if report.resync_bytes > 0 || report.disconnected > 0 {
        println!(
            "merged '{}' into '{}' (leg {}): generation {}, resyncing {} bytes, {} client(s) disconnected",
            report.split_volume, report.volume, report.leg, report.generation, report.resync_bytes, report.disconnected
        );
    } else {
        println!("'{}' leg {} is now volume '{}' (generation {} of '{}')", report.volume, report.leg, report.split_volume, report.generation, report.volume);
    }
}

fn show(list: MirrorList, json: bool) {
    if json {
        return render::json(&list);
    }
    let mut t = render::table(&["VOLUME", "PAIR", "LEG", "STATE", "IN SYNC", "LEFT", "RATE/s", "DIRTY", "REASON"]);
    for m in &list.mirrors {
        for leg in &m.legs {
            t.add_row(vec![
                Cell::new(&m.volume),
                Cell::new(&m.pair),
                Cell::new(&leg.backend),
                Cell::new(&leg.state),
                Cell::new(format!("{:.1}%", leg.percent)),
                Cell::new(render::human(leg.bytes_left)),
                Cell::new(render::human(leg.rate)),
                Cell::new(render::human(m.dirty_bytes)),
                Cell::new(leg.reason.as_deref().unwrap_or("")),
            ]);
        }
        for tr in &m.trackers {
            t.add_row(vec![Cell::new(&m.volume), Cell::new(&m.pair), Cell::new(format!("tracker {}", tr.name)), Cell::new(format!("{} changed", render::human(tr.changed_bytes)))]);
        }
    }
    render::right(&mut t, &[4, 5, 6, 7]);
    println!("{t}");
}

fn leg_of(list: MirrorList, volume: &str, leg: &str) -> Result<(MirrorStatus, usize), ApiError> {
    let m = list.mirrors.into_iter().find(|m| m.volume == volume).ok_or_else(|| other(format!("the answer lists no mirror of '{volume}'")))?;
    let i = m.legs.iter().position(|l| l.backend == leg).ok_or_else(|| other(format!("the answer lists no leg '{leg}' of '{volume}'")))?;
    Ok((m, i))
}

/// Follows a leg's resync until it is in sync (progress bar on a terminal,
/// lines otherwise); fails if the leg fails.
fn wait_in_sync(server: &ServerAddress, volume: &str, leg: &str) -> CliResult {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(100);
    if tty {
        bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}% ETA {eta}").map_err(|e| other(e.to_string()))?.progress_chars("=> "));
        bar.set_message(format!("resyncing {volume} leg {leg}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let (m, i) = leg_of(server.call(&Request::MirrorStatus { volume: Some(volume.to_string()) })?, volume, leg)?;
        let l = &m.legs[i];
        bar.set_position(l.percent as u64);
        if !tty && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!("mirror {volume} leg {leg}: {} {:.1}% ({} bytes left)", l.state, l.percent, l.bytes_left);
            last_line = Instant::now();
        }
        match l.state.as_str() {
            "in_sync" => {
                bar.finish_with_message(format!("{volume} leg {leg} in sync"));
                println!("leg '{leg}' of '{volume}' is in sync");
                return Ok(());
            }
            "failed" => {
                bar.abandon();
                let reason = l.reason.as_deref().unwrap_or("no reason given");
                return Err(ApiError::new(ErrorKind::Io, format!("leg '{leg}' of '{volume}' failed: {reason}")));
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
