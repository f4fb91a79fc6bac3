//! The reply side of a connection. Workers hand finished replies to the
//! sink; whichever worker finds the socket free becomes the writer and sends
//! everything queued so far in one `writev`, so under load many replies
//! share a syscall and no thread ever waits for the socket behind another.

use super::budget::Permit;
use super::pool::lock;
use super::stream::Stream;
use bytes::Bytes;
use std::io::IoSlice;
use std::sync::Mutex;

/// A complete reply: wire bytes in order, and the permit it releases once sent.
pub struct Reply {
    pub parts: Vec<Bytes>,
    /// Held only for its `Drop`, which returns the budget once sent.
    #[allow(dead_code)]
    pub permit: Option<Permit>,
}

impl Reply {
    pub fn new(bytes: impl Into<Bytes>, permit: Option<Permit>) -> Reply {
        Reply { parts: vec![bytes.into()], permit }
    }
}

#[derive(Default)]
struct Queue {
    replies: Vec<Reply>,
    writing: bool,
    broken: bool,
}

pub struct ReplySink {
    queue: Mutex<Queue>,
    stream: Mutex<Stream>,
}

/// Most iovecs handed to one writev (IOV_MAX is 1024 on Linux).
const MAX_IOV: usize = 1024;

impl ReplySink {
    pub fn new(stream: Stream) -> ReplySink {
        ReplySink { queue: Mutex::new(Queue::default()), stream: Mutex::new(stream) }
    }

    /// Queues `reply`, and writes the queue if no other thread is doing so.
    pub fn send(&self, reply: Reply) {
        {
            let mut q = lock(&self.queue);
            if q.broken {
                return; // client gone: drop the reply, releasing its permit
            }
            q.replies.push(reply);
            if q.writing {
                return;
            }
            q.writing = true;
        }
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.replies.is_empty() || q.broken {
                    q.writing = false;
                    q.replies.clear();
                    return;
                }
                std::mem::take(&mut q.replies)
            };
            if let Err(e) = self.write_batch(&batch) {
                tracing::debug!(error = %e, "reply write failed; dropping connection output");
                let mut q = lock(&self.queue);
                q.broken = true;
                q.replies.clear();
                q.writing = false;
                drop(q);
                lock(&self.stream).shutdown();
                return;
            }
            // `batch` drops here, returning its permits.
        }
    }

    fn write_batch(&self, batch: &[Reply]) -> std::io::Result<()> {
        let mut stream = lock(&self.stream);
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len().min(MAX_IOV));
        for part in batch.iter().flat_map(|r| r.parts.iter()).filter(|p| !p.is_empty()) {
            if slices.len() == MAX_IOV {
                stream.write_all_vectored(&mut slices)?;
                slices.clear();
            }
            slices.push(IoSlice::new(part));
        }
        stream.write_all_vectored(&mut slices)
    }

    /// Shuts the socket down (both directions); queued replies are dropped.
    pub fn close(&self) {
        lock(&self.queue).broken = true;
        lock(&self.stream).shutdown();
    }
}
