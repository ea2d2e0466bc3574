//! Where a synchronous handler call runs: on the runtime worker that received the
//! request when that is safe, so a fast handler costs no thread hop, and off it
//! otherwise, so a slow one never stalls accepting or the other connections.
//!
//! A handler blocking a worker thread holds up two things. The tasks queued on that
//! worker: at most `workers - 1` calls run inline at once, so another worker is always
//! left to steal them; a call that finds no free slot lets its worker run other tasks
//! once, tries again, and then goes to tokio's blocking pool (two thread hops). And
//! tokio's I/O driver: the other workers may all be asleep, and tokio wakes one only
//! when a queue holds more than one task. A watchdog thread covers that: when an inline
//! call has run for a tick with no other starting, it spawns an empty task from outside
//! the runtime, which wakes a sleeping worker; that worker steals what was queued behind
//! the call and then polls the driver while the call goes on. The watchdog sleeps with
//! no deadline until the first inline call and again whenever they stop for a while.
//!
//! `block_in_place` would also keep a blocked worker's queue moving, but it hands the
//! worker to a new thread on every call: under load the process grew to 50-90 threads
//! and 14 MiB, against about 20 threads and 9 MiB this way.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::Thread;
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::warn;

/// How often the watchdog looks, and so about how long I/O can wait behind a slow
/// inline call while every other worker sleeps.
const TICK: Duration = Duration::from_millis(1);
/// Quiet ticks (no inline call running or starting) before the watchdog sleeps until
/// the next inline call.
const QUIET_TICKS: u32 = 50;

/// Runs handler calls for one generation. See the module documentation.
#[derive(Debug)]
pub(crate) struct Runner {
    state: Arc<State>,
    /// The watchdog, to wake; `None` where nothing runs inline.
    watchdog: Option<Thread>,
}

#[derive(Debug)]
struct State {
    /// Inline slots left.
    free: AtomicUsize,
    /// Inline slots in all.
    slots: usize,
    /// Inline calls started so far: the watchdog's sign of progress.
    started: AtomicU64,
    /// Set while the watchdog is parked with no deadline (so at first).
    asleep: AtomicBool,
}

impl Runner {
    /// A runner for the runtime this is called on (none inline outside a multi-thread
    /// runtime).
    pub(crate) fn for_current_runtime() -> Self {
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let workers = handle.as_ref().map_or(0, |h| h.metrics().num_workers());
        let slots = workers.saturating_sub(1);
        let state = Arc::new(State {
            free: AtomicUsize::new(slots),
            slots,
            started: AtomicU64::new(0),
            asleep: AtomicBool::new(true),
        });
        let watchdog = match (handle, slots) {
            (Some(handle), 1..) => {
                let weak = Arc::downgrade(&state);
                match std::thread::Builder::new()
                    .name("gem-inline-watchdog".into())
                    .spawn(move || watch(&weak, &handle))
                {
                    Ok(thread) => Some(thread.thread().clone()),
                    Err(err) => {
                        warn!(cause = %err, "no watchdog thread; handlers run off the workers");
                        state.free.store(0, Ordering::Relaxed);
                        None
                    }
                }
            }
            _ => None,
        };
        Runner { state, watchdog }
    }

    /// Runs `call`: inline if `may_inline` and a slot is free, otherwise on the blocking
    /// pool. A panic becomes `Err` with a description.
    pub(crate) async fn run<T, F>(&self, may_inline: bool, call: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if may_inline && self.state.slots > 0 {
            if let Some(_slot) = self.try_take() {
                return catch_panic(call);
            }
            // Another call holds the slot, most likely for a microsecond or two: let
            // this worker run its other tasks first, then try once more.
            tokio::task::yield_now().await;
            if let Some(_slot) = self.try_take() {
                return catch_panic(call);
            }
        }
        tokio::task::spawn_blocking(call)
            .await
            .map_err(|join| join.to_string())
    }

    fn try_take(&self) -> Option<Slot<'_>> {
        let state = &*self.state;
        state
            .free
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()?;
        state.started.fetch_add(1, Ordering::SeqCst);
        if state.asleep.load(Ordering::SeqCst) && state.asleep.swap(false, Ordering::SeqCst) {
            if let Some(watchdog) = &self.watchdog {
                watchdog.unpark();
            }
        }
        Some(Slot(&state.free))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // The watchdog holds only a weak reference: woken, it finds it dead and ends.
        if let Some(watchdog) = &self.watchdog {
            watchdog.unpark();
        }
    }
}

/// A taken inline slot, given back on drop (panics included).
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

fn catch_panic<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
        .map_err(|_| "the handler panicked".to_string())
}

fn watch(state: &Weak<State>, runtime: &Handle) {
    // It starts asleep: the first inline call wakes it.
    std::thread::park();
    let mut seen = u64::MAX;
    let mut quiet = 0;
    let mut poked = false;
    loop {
        let Some(s) = state.upgrade() else { return };
        let started = s.started.load(Ordering::SeqCst);
        let running = s.slots - s.free.load(Ordering::Acquire).min(s.slots);
        if started != seen {
            (seen, quiet, poked) = (started, 0, false);
        } else if running > 0 {
            quiet = 0;
            if !poked {
                // An inline call has run a whole tick: make sure a worker is awake to
                // poll the I/O driver. One poke per stall is enough: that worker goes
                // back to sleep on the driver, not beside it.
                drop(runtime.spawn(async {}));
                poked = true;
            }
        } else {
            quiet += 1;
            if quiet >= QUIET_TICKS {
                s.asleep.store(true, Ordering::SeqCst);
                // A call that started before `asleep` was visible did not wake us.
                if s.started.load(Ordering::SeqCst) != seen {
                    s.asleep.store(false, Ordering::SeqCst);
                    continue;
                }
                drop(s);
                std::thread::park();
                quiet = 0;
                continue;
            }
        }
        drop(s);
        std::thread::sleep(TICK);
    }
}
