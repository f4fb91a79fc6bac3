//! Runs one fuzz target for a time budget: replays the committed corpus,
//! then generates and mutates inputs until the budget is spent. Each case
//! runs under `catch_unwind`, an allocation bound and a watchdog; a failing
//! input is shrunk, written to the corpus (`crash-*`, `hang-*`) and fails
//! the test naming the file.
//!
//! No coverage feedback on stable Rust: instead, inputs that show a new
//! *behaviour* (a feature the harness reports: an option answered a new
//! way in a new state) join the pool that mutations start from.

use crate::alloc;
use crate::mutate::{mutate, Rng, MAX_INPUT};
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most bytes one case may hold at once.
pub const ALLOC_LIMIT: i64 = 4 << 20;
/// A case running longer than this is a hang.
const HANG: Duration = Duration::from_secs(10);
/// Most inputs kept for mutation.
const POOL: usize = 4096;

pub struct Target {
    /// Also the corpus directory: fuzz/corpus/NAME.
    pub name: &'static str,
    /// The harness: `Err` is a bug; returns behaviour features.
    pub run: fn(&[u8]) -> Result<Vec<u64>, String>,
    pub generate: fn(&mut Rng) -> Vec<u8>,
}

/// Seconds per target: NBDVIRT_FUZZ_SECONDS, default 60 (0: corpus only).
fn budget() -> Duration {
    let secs = std::env::var("NBDVIRT_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    Duration::from_secs(secs)
}

fn seed() -> u64 {
    std::env::var("NBDVIRT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64))
}

pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

thread_local! {
    /// The message and place of the last panic on this thread.
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics on fuzz threads are expected (that is what is looked for) and
/// reported with the input: keep them off stderr, but keep where they were.
fn quiet_fuzz_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("fuzz-")) {
                PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                default(info);
            }
        }));
    });
}

/// One case under the panic catcher and the allocation bound.
fn run_case(target: &Target, input: &[u8]) -> Result<Vec<u64>, String> {
    let base = alloc::start();
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let peak = alloc::peak_since(base);
    match result {
        Err(_) => Err(format!("panic: {}", PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default())),
        Ok(Err(v)) => Err(v),
        Ok(Ok(_)) if peak > ALLOC_LIMIT => Err(format!("allocation: the case held {peak} bytes at once (bound {ALLOC_LIMIT})")),
        Ok(Ok(features)) => Ok(features),
    }
}

/// The kind of a failure (its first word): shrinking keeps it.
fn kind(failure: &str) -> &str {
    failure.split(':').next().unwrap_or(failure)
}

/// Deletes chunks of `input` while it fails the same way (bounded in time).
/// `mark` tells the watchdog about each attempt.
fn shrink(target: &Target, input: &[u8], failure: &str, mark: &dyn Fn(Option<&[u8]>)) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let fails = |c: &[u8]| {
        mark(Some(c));
        run_case(target, c).err().is_some_and(|f| kind(&f) == kind(failure))
    };
    let mut best = input.to_vec();
    let mut chunk = (best.len() / 2).max(1);
    while Instant::now() < deadline {
        let mut at = 0;
        let mut progress = false;
        while at + chunk <= best.len() && Instant::now() < deadline {
            let candidate: Vec<u8> = best[..at].iter().chain(&best[at + chunk..]).copied().collect();
            if fails(&candidate) {
                best = candidate;
                progress = true;
            } else {
                at += chunk;
            }
        }
        if !progress {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    best
}

fn save(target: &str, prefix: &str, input: &[u8]) -> PathBuf {
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3));
    let dir = corpus_dir(target);
    let path = dir.join(format!("{prefix}-{hash:016x}"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        panic!("cannot save the failing input to {}: {e}\ninput: {input:02x?}", path.display());
    }
    path
}

/// The input in hex, for a failure seen where the saved file is out of
/// reach (a CI log): `xxd -r -p` turns it back into the file.
fn hex(input: &[u8]) -> String {
    const SHOWN: usize = 16 * 1024;
    let text: String = input.iter().take(SHOWN).map(|b| format!("{b:02x}")).collect();
    let cut = if input.len() > SHOWN { " (cut)" } else { "" };
    format!("input in hex{cut}: {text}")
}

/// What the watchdog sees of the worker.
#[derive(Default)]
struct Progress {
    case: Option<(Instant, Vec<u8>)>,
    outcome: Option<Result<String, String>>,
}

/// Runs `target` (corpus, then the budget); panics with the failing input's
/// path on a bug.
pub fn drive(target: &'static Target) {
    quiet_fuzz_panics();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let shared = progress.clone();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .spawn(move || {
            let outcome = fuzz(target, &shared);
            shared.lock().unwrap_or_else(|p| p.into_inner()).outcome = Some(outcome);
        })
        .expect("spawn the fuzz worker");
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let p = progress.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outcome) = &p.outcome {
            match outcome {
                Ok(stats) => eprintln!("fuzz {}: {stats}", target.name),
                Err(failure) => panic!("fuzz target {}: {failure}", target.name),
            }
            break;
        }
        if let Some((started, input)) = p.case.as_ref().filter(|(started, _)| started.elapsed() > HANG) {
            // The worker is stuck in the server code: it cannot be stopped,
            // only reported (the test process exits without it).
            let path = save(target.name, "hang", input);
            panic!("fuzz target {}: hang: a case ran for {:?} without ending; input saved to {}\n{}", target.name, started.elapsed(), path.display(), hex(input));
        }
    }
    drop(worker.join());
}

/// The worker: Ok(statistics) or Err(the failure, with the saved input).
fn fuzz(target: &Target, progress: &Mutex<Progress>) -> Result<String, String> {
    let mark = |input: Option<&[u8]>| progress.lock().unwrap_or_else(|p| p.into_inner()).case = input.map(|i| (Instant::now(), i.to_vec()));
    // Builds the fixture outside any measurement.
    let _ = (target.run)(&[]);
    let mut pool = Vec::new();
    let mut seen = HashSet::new();
    let dir = corpus_dir(target.name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).map_err(|e| format!("corpus {}: {e}", dir.display()))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in &files {
        let input = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        mark(Some(&input));
        match run_case(target, &input) {
            Ok(features) => seen.extend(features),
            Err(failure) => return Err(format!("{failure}\ncorpus file {} fails (replay: NBDVIRT_FUZZ_SECONDS=0 cargo test --test fuzz)", file.display())),
        }
        pool.push(input);
    }
    let seed = seed();
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let budget = budget();
    let mut cases = 0u64;
    while started.elapsed() < budget {
        let mut input = if !pool.is_empty() && rng.one_in(2) { pool[rng.below(pool.len())].clone() } else { (target.generate)(&mut rng) };
        if input.len() < MAX_INPUT && rng.below(3) > 0 {
            mutate(&mut rng, &mut input, &pool);
        }
        mark(Some(&input));
        cases += 1;
        match run_case(target, &input) {
            Ok(features) => {
                let before = seen.len();
                seen.extend(features);
                if seen.len() > before {
                    if pool.len() >= POOL {
                        let i = rng.below(pool.len());
                        pool[i] = input;
                    } else {
                        pool.push(input);
                    }
                }
            }
            Err(failure) => {
                let small = shrink(target, &input, &failure, &mark);
                let why = run_case(target, &small).err().unwrap_or_else(|| failure.clone());
                let path = save(target.name, "crash", &small);
                return Err(format!(
                    "{why}\n(first seen as: {failure})\ninput ({} bytes, shrunk from {}) saved to {}: commit it, every run replays it (seed {seed})\n{}",
                    small.len(),
                    input.len(),
                    path.display(),
                    hex(&small)
                ));
            }
        }
    }
    mark(None);
    Ok(format!("{} corpus files, {cases} cases in {:?} (seed {seed}), {} behaviours seen, {} inputs pooled", files.len(), started.elapsed(), seen.len(), pool.len()))
}
