//! Closing uprobe links off the cuFile thread: a small pool of threads that hold nothing.
//!
//! Closing a link waits for an RCU grace period before `close` returns: 23–77 ms for a
//! multi-uprobe link (all of a file's probes), and for a perf-event uprobe 85–250 ms *each*,
//! serialized host-wide under the kernel's `event_mutex` (a library's 28 take seconds whoever
//! closes them; earlier code spawned one thread per link: 1,404 threads for 50 copies, and a
//! panic under a pids limit of 200). What matters is that the cuFile thread does not wait (a
//! process that maps a library meanwhile must be attached at once) and that what must happen
//! *after* the links are gone does: a held file is closed (ending its read lease, which lets a
//! waiting writer go on: see `lease`) and "detached" is logged only then. So a batch of links
//! and what follows it go to one of [`WORKERS`] threads, started on demand, which drop every
//! capability first (a thread inherits its creator's). Multi links closed on several threads
//! overlap their grace periods (shutdown). Where no thread can be started (a pids limit), the
//! caller does the work itself: slower, never lost.

use std::{
    sync::{Arc, Condvar, Mutex, mpsc},
    time::{Duration, Instant},
};

use aya::programs::uprobe::UProbeLink;

/// Most closing threads: enough for multi-link grace periods to overlap at shutdown (four
/// rounds close 100 links in about four periods), few enough for any pids limit.
pub const WORKERS: usize = 4;

/// A uprobe link of either kind; dropping it detaches.
#[expect(dead_code, reason = "held for its Drop, which detaches")]
pub enum Link {
    /// aya's perf-event uprobe (one probe).
    Perf(UProbeLink),
    /// A multi-uprobe link (`super::umulti`): any number of probes of one file.
    Multi(std::os::fd::OwnedFd),
}
/// Stack of a closing thread: it closes descriptors and logs.
const STACK: usize = 256 << 10;

type After = Box<dyn FnOnce(Duration) + Send>;

/// Links to close, then what to run (with the time the closes took).
struct Job {
    links: Vec<Link>,
    after: After,
}

impl Job {
    fn run(self) {
        let t = Instant::now();
        drop(self.links);
        (self.after)(t.elapsed());
    }
}

/// The pool (see the module documentation).
pub struct Releaser {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    threads: Arc<Mutex<usize>>,
    spawn_failed: std::sync::atomic::AtomicBool,
}

impl Default for Releaser {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Releaser {
            tx: Mutex::new(Some(tx)),
            rx: Arc::new(Mutex::new(rx)),
            threads: Arc::new(Mutex::new(0)),
            spawn_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Releaser {
    /// Closes `links` on a pool thread, then runs `after` there with the time it took.
    pub fn close_then(&self, links: Vec<Link>, after: impl FnOnce(Duration) + Send + 'static) {
        let job = Job {
            links,
            after: Box::new(after),
        };
        if job.links.is_empty() {
            return job.run();
        }
        if self.ensure_threads() {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match tx.map(|tx| tx.send(job)) {
                Some(Ok(())) => return,
                Some(Err(mpsc::SendError(job))) => return job.run(),
                None => unreachable!("the sender lives as long as the pool"),
            }
        }
        job.run();
    }

    /// Closes `links` in the background.
    pub fn close_later(&self, links: Vec<Link>) {
        self.close_then(links, |_| {});
    }

    /// Closes `links` and returns when they are closed or `deadline` passed (the rest still
    /// close). Returns how long it waited.
    pub fn close(&self, mut links: Vec<Link>, deadline: Duration) -> Duration {
        let t = Instant::now();
        // One share per thread: their grace periods overlap.
        let shares = WORKERS.min(links.len()).max(1);
        let per = links.len().div_ceil(shares);
        let left = Arc::new((Mutex::new(shares), Condvar::new()));
        for _ in 0..shares {
            let share: Vec<Link> = links.drain(..per.min(links.len())).collect();
            let l = left.clone();
            self.close_then(share, move |_| {
                *l.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                l.1.notify_all();
            });
        }
        let guard = left.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = left
            .1
            .wait_timeout_while(guard, deadline, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        t.elapsed()
    }

    /// Starts threads up to [`WORKERS`]; false when none runs.
    fn ensure_threads(&self) -> bool {
        let mut n = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        while *n < WORKERS {
            let (rx, threads) = (self.rx.clone(), self.threads.clone());
            let started = std::thread::Builder::new()
                .name("gds-detach".into())
                .stack_size(STACK)
                .spawn(move || worker(rx, threads));
            match started {
                Ok(_) => *n += 1,
                Err(e) => {
                    if !self
                        .spawn_failed
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            "cuFile: cannot start a thread to close uprobes ({e}; a pids or \
                             tasks limit?): the cuFile thread closes them itself, and waits"
                        );
                    }
                    break;
                }
            }
        }
        *n > 0
    }

    /// Threads running now.
    pub fn threads(&self) -> usize {
        *self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Releaser {
    /// Ends the threads once their queue is empty.
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn worker(rx: Arc<Mutex<mpsc::Receiver<Job>>>, threads: Arc<Mutex<usize>>) {
    // Hold nothing: capabilities are per thread and inherited from the creator.
    if let Err(e) = gds_host::privileges::drop_calling_thread_to(gds_host::privileges::CapSet(0)) {
        tracing::warn!("cuFile: a closing thread could not drop its capabilities ({e}); exits");
        *threads.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        return;
    }
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = job else { break };
        job.run();
    }
    *threads.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work is done, in order, and its follow-up runs after (no links needed to show it).
    #[test]
    fn follow_ups_run_in_order_on_the_pool() {
        let r = Releaser::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..5 {
            let s = seen.clone();
            r.close_then(Vec::new(), move |_| s.lock().unwrap().push(i));
        }
        let waited = r.close(Vec::new(), Duration::from_secs(5));
        assert!(waited < Duration::from_secs(5));
        assert_eq!(*seen.lock().unwrap(), [0, 1, 2, 3, 4]);
    }
}
