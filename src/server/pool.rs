//! The I/O worker pool. Backend calls are blocking syscalls (pread, pwrite,
//! fdatasync, fallocate, ioctl); they run here, on plain threads, shared by
//! all connections. A pool thread never waits for another job, so the pool
//! cannot deadlock on itself: a request split into pieces finishes in
//! whichever thread completes its last piece (see `fan_out`).

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = unbounded();
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("nbdvirt-io-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawn I/O thread")
            })
            .collect();
        Pool { tx: Some(tx), threads }
    }

    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            // Sending only fails once the pool is shut down, when nothing
            // is accepted any more.
            let _ = tx.send(Box::new(job));
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
        struct State<R, W> {
            work: W,
            remaining: AtomicUsize,
            results: Mutex<Vec<Option<R>>>,
            finish: Mutex<Option<Box<dyn FnOnce(Vec<R>) + Send>>>,
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
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Locks a mutex, ignoring poisoning: a panicking job must not take the
/// whole connection or pool down with it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_collects_in_order() {
        let pool = Arc::new(Pool::new(3));
        let (tx, rx) = std::sync::mpsc::channel();
        pool.fan_out(8, |i| i * 10, move |r| tx.send(r).unwrap());
        assert_eq!(rx.recv().unwrap(), (0..8).map(|i| i * 10).collect::<Vec<_>>());
        let (tx, rx) = std::sync::mpsc::channel();
        pool.fan_out(0, |i| i, move |r: Vec<usize>| tx.send(r.len()).unwrap());
        assert_eq!(rx.recv().unwrap(), 0);
    }
}
