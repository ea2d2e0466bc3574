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
//! left to steal them. And tokio's I/O driver: the other workers may all be asleep, and
//! tokio wakes one only when a queue holds more than one task. A watchdog thread covers
//! that: when an inline call is still running a tick after it was first seen (4 to 8 ms;
//! 1 ms for a while after a slow call was seen), it spawns an empty task from outside the
//! runtime, which wakes a sleeping worker; that worker steals what was queued behind
//! the call and then polls the driver while the call goes on. The watchdog sleeps with
//! no deadline until the first inline call and again whenever they stop for a while.
//!
//! What a call costs here is what decides gem's throughput against a plain hyper server,
//! so it touches no line another thread writes: each thread marks its calls on a cache
//! line of its own (odd while one runs), and counts the others' marks to keep to the
//! limit. A call that finds no free place first spins for up to 10 µs for one (a fast
//! handler's call takes a microsecond or two). If none comes free, its request leaves
//! the worker's fast path and waits: the worker serves its other connections, and the
//! next call to end wakes the waiting one on its own worker, where it runs inline (the
//! watchdog also wakes waiting calls at each tick, so none waits on a call end that
//! will not come). A waiting call goes to the blocking pool when no place is free and
//! the call in its way has run a whole watchdog tick, or after it has lost the race for
//! a place 8 times.
//!
//! Tried and dropped: `block_in_place` for calls that find no free place (it hands the
//! worker to a new thread every time; under load the process grew to 50-90 threads and
//! 14 MiB); yielding once before giving up on a place (a yielded task can only come back
//! on the same worker, possibly behind the next inline call); sending every call that
//! found no place to the blocking pool (on two workers, one call in a few collides,
//! and the thread hops cost about 5 % of throughput); and one shared slot table (its
//! cache line moved between the workers on every call).
//!
//! [`Handler::runs_inline`]: crate::handler::Handler::runs_inline

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
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

/// How often the watchdog looks while calls run inline and none has been slow lately,
/// and so about how long I/O can wait behind the first slow inline call while every
/// other worker sleeps. Looking every millisecond instead cost about 4 % of keep-alive
/// throughput on 2 cores: each look wakes a thread that preempts a busy one.
///
/// At this tick the watchdog lets the kernel wake it up to one more tick late
/// ([`CALM_SLACK`]), so its wake-up rides on a timer interrupt the kernel takes anyway
/// (the scheduler's own tick, every 4 ms at 250 Hz) instead of adding one of its own.
/// Under keep-alive load on 2 cores that was worth about 2 % of throughput, as much as
/// having no watchdog at all.
const CALM_TICK: Duration = Duration::from_millis(4);
/// The timer slack at [`CALM_TICK`]: a look comes 4 to 8 ms after the last one.
const CALM_SLACK: Duration = CALM_TICK;
/// How often it looks for `ALERT_TICKS` looks after it has seen a call run a whole
/// tick (or while calls wait for a place): a handler that was slow once may be again.
const TICK: Duration = Duration::from_millis(1);
const ALERT_TICKS: u32 = 100;
/// How long a call that finds every inline place taken spins for one: a few times a
/// fast handler's call.
const SPIN: Duration = Duration::from_micros(10);
/// How often a waiting call looks for a place (each time a call ended, it was woken
/// and another took the place first) before it goes to the blocking pool.
const MAX_LOOKS: u32 = 8;
/// Quiet ticks (no inline call running or starting) before the watchdog sleeps until
/// the next inline call.
const QUIET_TICKS: u32 = 50;
/// Threads that may run calls inline for one runner, at least: twice the workers if
/// that is more. A thread past them sends its calls to the blocking pool.
const MARKS: usize = 64;

/// Numbers runners, so a thread's cached mark index is never taken for another's.
static RUNNERS: AtomicU64 = AtomicU64::new(1);

/// Runners a thread remembers its mark for: the serving one and the one before it
/// (a resumed or a probation-failed generation serves beside the old one for a while).
const REMEMBERED: usize = 4;

thread_local! {
    /// This thread's marks: (a runner's number, its index there), the latest first.
    static MINE: Cell<[(u64, usize); REMEMBERED]> = const { Cell::new([(0, 0); REMEMBERED]) };
}

/// Runs handler calls for one generation. See the module documentation.
#[derive(Debug)]
pub(crate) struct Runner {
    state: Arc<State>,
    /// The watchdog, to wake; `None` where nothing runs inline.
    watchdog: Option<Thread>,
}

#[derive(Debug)]
struct State {
    /// This runner's number (`RUNNERS`).
    id: u64,
    /// One per thread that has made an inline call, on a cache line of its own: each
    /// is written only by its thread, so marking a call touches no shared line.
    marks: Box<[Mark]>,
    /// `marks[..claimed]` belong to threads.
    claimed: AtomicUsize,
    /// How many calls may run inline at once: one worker is always left free.
    limit: usize,
    /// Set while the watchdog is parked with no deadline (so at first).
    asleep: AtomicBool,
    /// Calls waiting for a free place ([`Runner::run`]), all woken when a call ends.
    waiters: Mutex<Vec<Waker>>,
    /// `waiters.len()`, to be read without the lock.
    waiting: AtomicUsize,
    /// Set by the watchdog while an inline call has run a whole tick: the waiting
    /// calls then go to the blocking pool.
    stuck: AtomicBool,
    /// The watchdog's timer slack in nanoseconds, as the kernel reported it after the
    /// watchdog last changed it (0 before that).
    #[cfg(test)]
    slack_ns: AtomicU64,
}

/// A thread's inline calls: odd while one runs. Each call adds two, so the watchdog
/// tells a call that ran a whole tick from a new one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Mark(AtomicU64);

impl State {
    fn new(limit: usize) -> Self {
        State {
            id: RUNNERS.fetch_add(1, Ordering::Relaxed),
            marks: (0..if limit == 0 {
                0
            } else {
                MARKS.max(2 * limit + 2)
            })
                .map(|_| Mark::default())
                .collect(),
            claimed: AtomicUsize::new(0),
            limit,
            asleep: AtomicBool::new(true),
            waiters: Mutex::default(),
            waiting: AtomicUsize::new(0),
            stuck: AtomicBool::new(false),
            #[cfg(test)]
            slack_ns: AtomicU64::new(0),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes every waiting call, to look for a place again.
    fn wake_waiters(&self) {
        let woken = {
            let mut waiters = self.waiters();
            self.waiting.store(0, Ordering::SeqCst);
            std::mem::take(&mut *waiters)
        };
        woken.into_iter().for_each(Waker::wake);
    }

    fn in_use(&self) -> &[Mark] {
        let n = self.claimed.load(Ordering::SeqCst).min(self.marks.len());
        &self.marks[..n]
    }

    /// This thread's mark, claimed on its first call (`None` once all are claimed).
    fn mine(&self) -> Option<&Mark> {
        let mut mine = MINE.get();
        if let Some(&(_, index)) = mine.iter().find(|(runner, _)| *runner == self.id) {
            return self.marks.get(index);
        }
        let index = self.claimed.fetch_add(1, Ordering::SeqCst);
        mine.rotate_right(1);
        mine[0] = (self.id, index);
        MINE.set(mine);
        self.marks.get(index)
    }

    /// Inline calls running on threads other than the one with `mine`.
    fn others_running(&self, mine: &Mark) -> usize {
        self.in_use()
            .iter()
            .filter(|m| !std::ptr::eq(*m, mine) && m.0.load(Ordering::SeqCst) & 1 == 1)
            .count()
    }
}

impl Runner {
    /// A runner for the runtime this is called on (none inline outside a multi-thread
    /// runtime).
    pub(crate) fn for_current_runtime() -> Self {
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let limit = handle
            .as_ref()
            .map_or(0, |h| h.metrics().num_workers().saturating_sub(1));
        let Some(handle) = handle.filter(|_| limit > 0) else {
            return Runner::blocking_only();
        };
        let state = Arc::new(State::new(limit));
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
            state: Arc::new(State::new(0)),
            watchdog: None,
        }
    }

    /// Runs `call` right here if an inline place is free (`None` if not). Unlike
    /// [`Runner::run_blocking`], `call` may borrow. A panic becomes `Err` with its
    /// message.
    pub(crate) fn try_inline<T>(&self, call: impl FnOnce() -> T) -> Option<Result<T, String>> {
        // No spinning behind a call that has run a whole tick.
        let spin = match self.state.stuck.load(Ordering::Relaxed) {
            true => Duration::ZERO,
            false => SPIN,
        };
        let _running = self.enter(spin)?;
        Some(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
                .map_err(|payload| panic_message(payload.as_ref())),
        )
    }

    /// Runs `call` inline as soon as a place is free, or on the blocking pool if the
    /// call in the way has run a whole tick, after `MAX_LOOKS` lost races for a place,
    /// or if nothing runs inline here. While it
    /// waits, its worker serves other tasks; the call that frees a place wakes it on
    /// that call's own worker. A panic becomes `Err` with its message.
    pub(crate) async fn run<T, F>(&self, call: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let mut looks = 0;
        let place = std::future::poll_fn(|cx| {
            looks += 1;
            self.poll_place(cx, looks > MAX_LOOKS)
        });
        match place.await {
            Some(running) => {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
                    .map_err(|payload| panic_message(payload.as_ref()));
                drop(running);
                result
            }
            None => self.run_blocking(call).await,
        }
    }

    /// A free place (`Some`), or `None` for the blocking pool: when the call in the
    /// way is stuck, or when told to `give_up` (it lost the race for one too often).
    fn poll_place(&self, cx: &mut Context<'_>, give_up: bool) -> Poll<Option<Running<'_>>> {
        let state = &*self.state;
        // A thread past the marks can never take a place: it must not wait for one.
        if give_up || self.watchdog.is_none() || state.mine().is_none() {
            return Poll::Ready(None);
        }
        if let Some(running) = self.enter(Duration::ZERO) {
            return Poll::Ready(Some(running));
        }
        if state.stuck.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        {
            let mut waiters = state.waiters();
            waiters.push(cx.waker().clone());
            state.waiting.store(waiters.len(), Ordering::SeqCst);
        }
        // A call may have ended before this one was queued, and then not woken it.
        match self.enter(Duration::ZERO) {
            Some(running) => Poll::Ready(Some(running)),
            None => Poll::Pending,
        }
    }

    /// Runs `call` on the blocking pool. A panic becomes `Err` with its message.
    pub(crate) async fn run_blocking<T, F>(&self, call: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        tokio::task::spawn_blocking(call)
            .await
            .map_err(|join| match join.try_into_panic() {
                Ok(payload) => panic_message(payload.as_ref()),
                Err(join) => join.to_string(),
            })
    }

    /// Marks a call running on this thread, if that leaves a worker free: at once, or
    /// after spinning up to `spin` for another call to end.
    fn enter(&self, spin: Duration) -> Option<Running<'_>> {
        let state = &*self.state;
        let mark = state.mine()?;
        let mut idle = mark.0.load(Ordering::Relaxed);
        let mut deadline = None;
        loop {
            // Marked before the others are counted, as they mark before counting us
            // (sequentially consistent): of two threads entering at once, at least
            // one sees the other, so the limit is never passed.
            mark.0.store(idle + 1, Ordering::SeqCst);
            if state.others_running(mark) < state.limit {
                break;
            }
            // Backed out one step on, so the watchdog never takes two tries for one
            // long call.
            idle += 2;
            mark.0.store(idle, Ordering::SeqCst);
            if spin.is_zero() {
                return None;
            }
            let until = *deadline.get_or_insert_with(|| std::time::Instant::now() + spin);
            // A fast handler's call takes a microsecond or two: wait for one to end
            // rather than pay the blocking pool's two thread hops.
            loop {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                if state.others_running(mark) < state.limit {
                    break;
                }
                if std::time::Instant::now() >= until {
                    return None;
                }
            }
        }
        if state.asleep.load(Ordering::SeqCst)
            && state.asleep.swap(false, Ordering::SeqCst)
            && let Some(watchdog) = &self.watchdog
        {
            watchdog.unpark();
        }
        Some(Running { state, mark, idle })
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

/// A call running inline; its mark goes back to idle (one step on) on drop, panics
/// included, and the calls waiting for a place are woken.
struct Running<'a> {
    state: &'a State,
    mark: &'a Mark,
    idle: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Marked idle before the waiters are looked at, as they queue before looking
        // at the marks (sequentially consistent): a waiter is woken or sees the place.
        self.mark.0.store(self.idle + 2, Ordering::SeqCst);
        if self.state.waiting.load(Ordering::SeqCst) > 0 {
            self.state.wake_waiters();
        }
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
    let Some(marks) = state.upgrade().map(|s| s.marks.len()) else {
        return;
    };
    // Per mark: its value at the last tick, and the last call poked for.
    let mut seen = vec![0; marks];
    let mut poked = vec![0; marks];
    let mut quiet = 0;
    let mut alert = 0;
    // The timer slack last set (`None`: the default).
    let mut slacked = None;
    loop {
        let Some(s) = state.upgrade() else { return };
        let mut active = false;
        let mut stuck = false;
        let mut running = false;
        for (i, mark) in s.in_use().iter().enumerate() {
            let now = mark.0.load(Ordering::Acquire);
            running |= now & 1 == 1;
            if now & 1 == 1 && now == seen[i] {
                stuck = true;
                if poked[i] != now {
                    // This call has run a whole tick: make sure a worker is awake to
                    // poll the I/O driver. One poke per call is enough: that worker
                    // goes back to sleep on the driver, not beside it.
                    drop(runtime.spawn(async {}));
                    poked[i] = now;
                }
            }
            active |= now & 1 == 1 || now != seen[i];
            seen[i] = now;
        }
        if stuck != s.stuck.load(Ordering::Relaxed) {
            s.stuck.store(stuck, Ordering::Relaxed);
        }
        let waiting = s.waiting.load(Ordering::SeqCst) > 0;
        if waiting && (stuck || !running) {
            // Behind a slow call they go to the blocking pool. With no call running,
            // they look again: two that backed out of each other's way at once would
            // otherwise wait for a call end that may not come. (A running call wakes
            // them as it ends; each gives up after `MAX_LOOKS` looks.)
            s.wake_waiters();
        }
        active |= waiting;
        alert = if stuck {
            ALERT_TICKS
        } else {
            alert.saturating_sub(1)
        };
        let tick = if alert > 0 || waiting {
            TICK
        } else {
            CALM_TICK
        };
        if active {
            quiet = 0;
        } else {
            quiet += 1;
            if quiet >= QUIET_TICKS {
                s.asleep.store(true, Ordering::SeqCst);
                // A call that started before `asleep` was visible did not wake us.
                let moved = s
                    .in_use()
                    .iter()
                    .enumerate()
                    .any(|(i, m)| m.0.load(Ordering::SeqCst) != seen[i]);
                if moved {
                    s.asleep.store(false, Ordering::SeqCst);
                    continue;
                }
                drop(s);
                std::thread::park();
                quiet = 0;
                continue;
            }
        }
        let slack = (tick == CALM_TICK).then_some(CALM_SLACK);
        if slack != slacked {
            set_timer_slack(slack);
            slacked = slack;
            #[cfg(test)]
            s.slack_ns.store(
                rustix::thread::current_timer_slack().unwrap_or(0),
                Ordering::SeqCst,
            );
        }
        drop(s);
        std::thread::sleep(tick);
    }
}

/// Sets this thread's timer slack (`None`: the default, 50 µs). It only saves CPU, so a
/// failure leaves the default and is not worth a word.
fn set_timer_slack(slack: Option<Duration>) {
    let nanos = slack
        .and_then(|s| std::num::NonZeroU64::new(u64::try_from(s.as_nanos()).unwrap_or(u64::MAX)));
    let _ = rustix::thread::set_current_timer_slack(nanos);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-worker runtime (so one inline place) and its runner.
    fn two_workers() -> (tokio::runtime::Runtime, Arc<Runner>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let runner = Arc::new(rt.block_on(async { Runner::for_current_runtime() }));
        (rt, runner)
    }

    #[test]
    fn one_worker_stays_free_and_a_call_behind_a_stuck_one_goes_to_the_pool() {
        let (rt, runner) = two_workers();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (entered, is_in) = std::sync::mpsc::channel::<()>();
        let holder = {
            let runner = runner.clone();
            rt.spawn(async move {
                runner.try_inline(move || {
                    entered.send(()).unwrap();
                    released.recv().unwrap();
                })
            })
        };
        is_in.recv().unwrap();
        rt.block_on(async {
            // The other worker may not take the only place...
            let again = runner.clone();
            let second = tokio::spawn(async move { again.try_inline(|| ()).is_some() });
            assert!(!second.await.unwrap(), "both workers ran calls inline");
            // ...and a call waiting for it ends up on the blocking pool.
            let again = runner.clone();
            let waiter = tokio::spawn(async move {
                let here = std::thread::current().id();
                let ran_on = again.run(|| std::thread::current().id()).await.unwrap();
                (here, ran_on)
            });
            let (here, ran_on) = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .unwrap()
                .unwrap();
            assert_ne!(here, ran_on, "it ran inline while the holder ran");
        });
        release.send(()).unwrap();
        assert!(rt.block_on(holder).unwrap().is_some());
        // The place is free again.
        let runner2 = runner.clone();
        let after =
            rt.block_on(async move { tokio::spawn(async move { runner2.try_inline(|| 1) }).await });
        assert_eq!(after.unwrap(), Some(Ok(1)));
    }

    #[test]
    fn the_watchdog_lets_calm_looks_wait_for_a_timer_interrupt_but_not_alert_ones() {
        let (rt, runner) = two_workers();
        let slack = || runner.state.slack_ns.load(Ordering::SeqCst);
        let calm = u64::try_from(CALM_SLACK.as_nanos()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let call = |ms| {
            let r = runner.clone();
            rt.block_on(async move {
                tokio::spawn(async move {
                    r.try_inline(move || std::thread::sleep(Duration::from_millis(ms)))
                })
                .await
                .unwrap()
            })
        };
        // Fast calls: the watchdog wakes and looks at its calm tick, with the slack.
        while slack() != calm {
            assert!(std::time::Instant::now() < deadline, "slack {} ns", slack());
            assert_eq!(call(0), Some(Ok(())));
        }
        // A call that runs several ticks: for 100 ms after it, it looks every millisecond,
        // on time. (Another slow call if this thread looked only after those 100 ms.)
        while slack() == calm {
            assert!(std::time::Instant::now() < deadline, "still the calm slack");
            assert_eq!(call(50), Some(Ok(())));
        }
        assert!(slack() < calm / 10, "alert slack {} ns", slack());
    }

    #[test]
    fn a_panicking_inline_call_is_an_error_and_frees_its_place() {
        let (rt, runner) = two_workers();
        let r = runner.clone();
        let outcome = rt.block_on(async move {
            tokio::spawn(async move {
                let first = r.try_inline(|| -> u8 { panic!("boom") });
                let second = r.try_inline(|| 2);
                (first, second)
            })
            .await
            .unwrap()
        });
        let (first, second) = outcome;
        assert_eq!(first, Some(Err("the handler panicked: boom".to_owned())));
        assert_eq!(second, Some(Ok(2)));
        // No mark is left marking a call as running.
        assert!(
            runner
                .state
                .in_use()
                .iter()
                .all(|m| m.0.load(Ordering::SeqCst) & 1 == 0)
        );
    }
}
