//! Where a synchronous handler call runs: on the runtime worker that received the
//! request when that is safe, so a fast handler costs no thread hop, and on tokio's
//! blocking pool otherwise, so a slow one never stalls accepting or the other
//! connections.
//!
//! Only handlers that never touch tokio may run inline ([`Handler::runs_inline`]: plugin
//! handlers do; in-process ones do not by default, because a task they spawned or woke
//! would wait, unstealable, behind them on the same worker). Only bodiless requests run
//! inline: reading a body can wake the HTTP/2 connection task onto this worker's
//! next-task slot, where no other worker can take it.
//!
//! A handler blocking a worker thread holds up two things. The tasks queued on that
//! worker: at most `workers - 1` calls run inline at once, so another worker is always
//! left to steal them; a call that finds no free slot goes to the blocking pool. And
//! tokio's I/O driver: the other workers may all be asleep, and tokio wakes one only
//! when a queue holds more than one task. A watchdog thread covers that: when an inline
//! call is still running a tick after it was first seen, it spawns an empty task from
//! outside the runtime, which wakes a sleeping worker; that worker steals what was
//! queued behind the call and then polls the driver while the call goes on. The
//! watchdog sleeps with no deadline until the first inline call and again whenever
//! they stop for a while.
//!
//! A call that finds every slot taken first spins for up to 10 µs for one to come free
//! (a fast handler's call takes a microsecond or two), which saves most of the thread
//! hops to the blocking pool that such collisions used to cost.
//!
//! Tried and dropped: `block_in_place` for calls that find no free slot (it hands the
//! worker to a new thread every time; under load the process grew to 50-90 threads and
//! 14 MiB), and yielding once before giving up on a slot (a yielded task can only come
//! back on the same worker, possibly behind the next inline call).
//!
//! [`Handler::runs_inline`]: crate::handler::Handler::runs_inline

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::Thread;
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::warn;

/// The multi-thread runtime gem serves on, as `gem serve` builds it. Embedders who
/// want the same throughput build theirs with this too.
///
/// A worker runs its next-task slot before its own queue, except when it checks the
/// shared queue first; tokio's self-tuned interval does that every other task once
/// handlers take 100 µs. A fixed, rarer check makes it less likely that a connection in
/// that slot waits behind a handler running inline. (`examples/hyper_hello.rs`, the
/// benchmark ceiling, matches it.) After [`crate::Server::run`] returns, shut the
/// runtime down with a short `shutdown_timeout`: a handler still blocked after the
/// drain cut its connection must not hold the exit.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .global_queue_interval(61)
        .build()
}

/// How often the watchdog looks, and so about how long I/O can wait behind a slow
/// inline call while every other worker sleeps.
const TICK: Duration = Duration::from_millis(1);
/// How long a call that finds every inline slot taken waits for one before it goes to
/// the blocking pool: a few times a fast handler's call, a fraction of a thread hop.
const SPIN: Duration = Duration::from_micros(10);
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
    /// One per inline slot: 0 while free, else the number of the call in it.
    slots: Box<[AtomicU64]>,
    /// Inline calls started so far; numbers calls from 1.
    started: AtomicU64,
    /// Set while the watchdog is parked with no deadline (so at first).
    asleep: AtomicBool,
}

impl State {
    fn free_slot(&self) -> Option<&AtomicU64> {
        self.slots.iter().find(|s| s.load(Ordering::Relaxed) == 0)
    }

    /// Every slot is taken: waits a few microseconds for one to come free, which a
    /// fast handler's does, rather than pay the blocking pool's two thread hops.
    fn spin_for_slot(&self) -> Option<&AtomicU64> {
        if self.slots.is_empty() {
            return None;
        }
        let deadline = std::time::Instant::now() + SPIN;
        loop {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            if let Some(free) = self.free_slot() {
                return Some(free);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
        }
    }

    fn with_slots(n: usize) -> Self {
        State {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            started: AtomicU64::new(0),
            asleep: AtomicBool::new(true),
        }
    }
}

impl Runner {
    /// A runner for the runtime this is called on (none inline outside a multi-thread
    /// runtime).
    pub(crate) fn for_current_runtime() -> Self {
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let slots = handle
            .as_ref()
            .map_or(0, |h| h.metrics().num_workers().saturating_sub(1));
        let Some(handle) = handle.filter(|_| slots > 0) else {
            return Runner::blocking_only();
        };
        let state = Arc::new(State::with_slots(slots));
        let weak = Arc::downgrade(&state);
        match std::thread::Builder::new()
            .name("gem-inline-watchdog".into())
            .spawn(move || watch(&weak, &handle))
        {
            Ok(thread) => Runner {
                state,
                watchdog: Some(thread.thread().clone()),
            },
            Err(err) => {
                warn!(cause = %err, "no watchdog thread; every handler call goes to the blocking pool");
                Runner::blocking_only()
            }
        }
    }

    fn blocking_only() -> Self {
        Runner {
            state: Arc::new(State::with_slots(0)),
            watchdog: None,
        }
    }

    /// Runs `call` right here if an inline slot is free (`None` if not). Unlike
    /// [`Runner::run`], `call` may borrow. A panic becomes `Err` with its message.
    pub(crate) fn try_inline<T>(&self, call: impl FnOnce() -> T) -> Option<Result<T, String>> {
        let _slot = self.try_take()?;
        Some(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
                .map_err(|payload| panic_message(payload.as_ref())),
        )
    }

    /// Runs `call`: inline if `may_inline` and a slot is free, otherwise on the blocking
    /// pool. A panic becomes `Err` with its message.
    pub(crate) async fn run<T, F>(&self, may_inline: bool, call: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        if let Some(_slot) = may_inline.then(|| self.try_take()).flatten() {
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
                .map_err(|payload| panic_message(payload.as_ref()));
        }
        tokio::task::spawn_blocking(call)
            .await
            .map_err(|join| match join.try_into_panic() {
                Ok(payload) => panic_message(payload.as_ref()),
                Err(join) => join.to_string(),
            })
    }

    fn try_take(&self) -> Option<Slot<'_>> {
        let state = &*self.state;
        let free = state.free_slot().or_else(|| state.spin_for_slot())?;
        let number = state.started.fetch_add(1, Ordering::SeqCst) + 1;
        free.compare_exchange(0, number, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        if state.asleep.load(Ordering::SeqCst)
            && state.asleep.swap(false, Ordering::SeqCst)
            && let Some(watchdog) = &self.watchdog
        {
            watchdog.unpark();
        }
        Some(Slot(free))
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
struct Slot<'a>(&'a AtomicU64);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    match message {
        Some(message) => format!("the handler panicked: {message}"),
        None => "the handler panicked".to_owned(),
    }
}

fn watch(state: &Weak<State>, runtime: &Handle) {
    // It starts asleep: the first inline call wakes it.
    std::thread::park();
    let Some(slots) = state.upgrade().map(|s| s.slots.len()) else {
        return;
    };
    // Per slot: the call seen there at the last tick, and the last call poked for.
    let mut seen = vec![0; slots];
    let mut poked = vec![0; slots];
    let mut started_seen = 0;
    let mut quiet = 0;
    loop {
        let Some(s) = state.upgrade() else { return };
        let mut running = false;
        for (i, slot) in s.slots.iter().enumerate() {
            let call = slot.load(Ordering::Acquire);
            if call != 0 {
                running = true;
                if call == seen[i] && poked[i] != call {
                    // This call has run a whole tick: make sure a worker is awake to
                    // poll the I/O driver. One poke per call is enough: that worker
                    // goes back to sleep on the driver, not beside it.
                    drop(runtime.spawn(async {}));
                    poked[i] = call;
                }
            }
            seen[i] = call;
        }
        let started = s.started.load(Ordering::SeqCst);
        if running || started != started_seen {
            started_seen = started;
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= QUIET_TICKS {
                s.asleep.store(true, Ordering::SeqCst);
                // A call that started before `asleep` was visible did not wake us.
                if s.started.load(Ordering::SeqCst) != started_seen {
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
