//! The I/O worker pool. Backend calls are blocking syscalls (pread, pwrite,
//! fdatasync, fallocate, ioctl); they run here, on plain threads, shared by
//! all connections. A pool thread never waits for another job, so the pool
//! cannot deadlock on itself: a request split into pieces finishes in
//! whichever thread completes its last piece (see `fan_out`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The queue: a mutex-protected deque and a condvar. Idle workers sleep on
/// the condvar; a submit wakes one only when one is idle. (A spinning
/// channel made idle workers `sched_yield` thousands of times a second,
/// costing more CPU than the I/O itself on 4 KiB requests.)
#[derive(Default)]
struct JobQueue {
    jobs: VecDeque<Job>,
    idle: usize,
    closed: bool,
}

struct PoolState {
    queue: Mutex<JobQueue>,
    ready: Condvar,
}

pub struct WorkerPool {
    shared: Arc<PoolState>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    pub fn new(threads: usize) -> WorkerPool {
        WorkerPool::with_name(threads, "nbdvirt-io")
    }

    pub fn with_name(threads: usize, name: &str) -> WorkerPool {
        let shared = Arc::new(PoolState { queue: Mutex::new(JobQueue::default()), ready: Condvar::new() });
        let threads = (0..threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || worker(&shared)).expect("spawn I/O thread")
            })
            .collect();
        WorkerPool { shared, threads }
    }

    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = lock(&self.shared.queue);
        if q.closed {
            return; // shut down: nothing is accepted any more
        }
        q.jobs.push_back(Box::new(job));
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }

    /// Runs `work(i)` for `i in 0..n` in parallel (index 0 on the calling
    /// thread) and calls `finish` with the results in index order, on the
    /// thread that completes last.
    pub fn fan_out<R, W, F>(self: &Arc<Self>, n: usize, work: W, finish: F)
    where
        R: Send + 'static,
        W: Fn(usize) -> R + Send + Sync + 'static,
        F: FnOnce(Vec<R>) + Send + 'static,
    {
        type Finish<R> = Box<dyn FnOnce(Vec<R>) + Send>;
        struct State<R, W> {
            work: W,
            remaining: AtomicUsize,
            results: Mutex<Vec<Option<R>>>,
            finish: Mutex<Option<Finish<R>>>,
        }
        fn run<R, W: Fn(usize) -> R>(state: &State<R, W>, i: usize) {
            let r = (state.work)(i);
            lock(&state.results)[i] = Some(r);
            if state.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                let results = std::mem::take(&mut *lock(&state.results)).into_iter().map(|r| r.expect("every piece ran")).collect();
                if let Some(finish) = lock(&state.finish).take() {
                    finish(results);
                }
            }
        }
        let state = Arc::new(State {
            work,
            remaining: AtomicUsize::new(n),
            results: Mutex::new((0..n).map(|_| None).collect()),
            finish: Mutex::new(Some(Box::new(finish))),
        });
        if n == 0 {
            if let Some(finish) = lock(&state.finish).take() {
                finish(Vec::new());
            }
            return;
        }
        for i in 1..n {
            let state = state.clone();
            self.spawn(move || run(&state, i));
        }
        run(&state, 0);
    }

    /// Stops the threads after the queued jobs ran.
    pub fn shutdown(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(shared: &PoolState) {
    let mut q = lock(&shared.queue);
    loop {
        if let Some(job) = q.jobs.pop_front() {
            drop(q);
            job();
            q = lock(&shared.queue);
            continue;
        }
        if q.closed {
            return;
        }
        q.idle += 1;
        q = crate::sync::wait(&shared.ready, q);
        q.idle -= 1;
    }
}

/// The server's two pools. Stores that may block for long (block devices,
/// rotational or O_DIRECT stores) need many threads to keep a deep device
/// queue busy; I/O that is mostly a copy to or from the page cache wants no
/// more runnable threads than CPUs: on 2 CPUs, 1 MiB reads from a tmpfs
/// file ran at 0.90x nbdkit with 16 threads and 1.39x with 2 (more threads
/// only add context switches and cold caches).
pub struct Pools {
    /// `server.io_threads` threads: FLUSH, TRIM, WRITE_ZEROES, CACHE, block
    /// status, and everything on stores that may block.
    pub blocking: Arc<WorkerPool>,
    /// One thread per CPU: READ and WRITE to stores that do not block long.
    pub cpu: Arc<WorkerPool>,
}

impl Pools {
    pub fn new(io_threads: usize, cpu_threads: usize) -> Pools {
        Pools { blocking: Arc::new(WorkerPool::new(io_threads)), cpu: Arc::new(WorkerPool::with_name(cpu_threads, "nbdvirt-cpu")) }
    }
}

/// Threads of the CPU pool: one per CPU, at least 2.
pub fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)
}

/// Locks a mutex, ignoring poisoning: a panicking job must not take the
/// whole connection or pool down with it.
pub use crate::sync::lock;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_collects_in_order() {
        let pool = Arc::new(WorkerPool::new(3));
        let (tx, rx) = std::sync::mpsc::channel();
        pool.fan_out(8, |i| i * 10, move |r| tx.send(r).unwrap());
        assert_eq!(rx.recv().unwrap(), (0..8).map(|i| i * 10).collect::<Vec<_>>());
        let (tx, rx) = std::sync::mpsc::channel();
        pool.fan_out(0, |i| i, move |r: Vec<usize>| tx.send(r.len()).unwrap());
        assert_eq!(rx.recv().unwrap(), 0);
    }
}
