//! What gem's accept loops share: backing off, with one log line each way, when the
//! process runs out of file descriptors or memory; and admitting a bounded number of
//! connections.
//!
//! An accept that fails for lack of fds leaves the connection in the kernel's backlog
//! and the listener readable, so retrying at once spins at 100 % CPU and logs each
//! failure. [`Backoff`] sleeps instead, 5 ms doubling to 1 s, and logs once when the
//! trouble starts and once when it ends.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The first pause after a resource error.
const FIRST_DELAY: Duration = Duration::from_millis(5);
/// The longest pause: how late an accept loop may notice that fds are free again.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How long accepting must work before the trouble counts as over. At the limit, every
/// fd that frees up lets one accept through; without this, each would log two lines.
const QUIET: Duration = Duration::from_secs(1);

/// Whether `err` concerns only the connection being accepted (the next accept may well
/// succeed at once), rather than the process (out of fds, buffers or memory).
pub(crate) fn is_per_connection(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// The backoff state of one accept loop. The loop calls [`Backoff::failed`] and
/// [`Backoff::succeeded`] after each accept, and [`Backoff::settle`] once the instant
/// [`Backoff::settles_at`] gave has passed.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// What the loop accepts on, for the log lines.
    addr: String,
    /// The next pause.
    delay: Duration,
    /// Set from the first failure until accepting has worked for [`QUIET`].
    trouble: Option<Trouble>,
}

/// A run of failed accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trouble {
    since: Instant,
    failures: u64,
    /// When accepting last started to work again, if it has since the last failure.
    working_since: Option<Instant>,
}

impl Backoff {
    /// A loop accepting on `addr` (a socket address or a path), not in trouble.
    pub(crate) fn new(addr: impl Display) -> Backoff {
        Backoff {
            addr: addr.to_string(),
            delay: FIRST_DELAY,
            trouble: None,
        }
    }

    /// Handles a failed accept: a per-connection error is logged at debug and the loop
    /// goes on at once; any other error pauses the loop, longer each time, and only the
    /// first of a run is logged above debug.
    pub(crate) async fn failed(&mut self, err: &io::Error) {
        if is_per_connection(err) {
            debug!(cause = %err, "accept on {}: the connection failed first", self.addr);
            return;
        }
        let (pause, first) = self.fail(Instant::now());
        if first {
            warn!(
                "[{}] cannot accept on {}: {err}; backing off",
                std::process::id(),
                self.addr
            );
        } else {
            debug!(cause = %err, "accept on {} failed again", self.addr);
        }
        tokio::time::sleep(pause).await;
    }

    /// Notes a successful accept.
    pub(crate) fn succeeded(&mut self) {
        if let Some(trouble) = &mut self.trouble {
            trouble.working_since.get_or_insert_with(Instant::now);
        }
    }

    /// When the current trouble will count as over if no accept fails until then.
    pub(crate) fn settles_at(&self) -> Option<Instant> {
        Some(self.trouble?.working_since? + QUIET)
    }

    /// Ends the trouble, logging how long it lasted.
    pub(crate) fn settle(&mut self) {
        if let Some((failures, over)) = self.end() {
            info!(
                "[{}] accepting on {} again after {failures} failed attempts over {:.1}s",
                std::process::id(),
                self.addr,
                over.as_secs_f64()
            );
        }
    }

    /// Counts a resource failure at `now`: how long to pause, and whether it starts a
    /// run.
    fn fail(&mut self, now: Instant) -> (Duration, bool) {
        let first = self.trouble.is_none();
        let trouble = self.trouble.get_or_insert(Trouble {
            since: now,
            failures: 0,
            working_since: None,
        });
        trouble.failures += 1;
        trouble.working_since = None;
        let pause = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        (pause, first)
    }

    /// Ends a run of failures: how many there were, and how long until accepting worked.
    fn end(&mut self) -> Option<(u64, Duration)> {
        self.delay = FIRST_DELAY;
        let trouble = self.trouble.take()?;
        let until = trouble.working_since.unwrap_or(trouble.since);
        Some((
            trouble.failures,
            until.saturating_duration_since(trouble.since),
        ))
    }
}

/// Sleeps until `at`, or for ever if there is nothing to wait for: a `select!` branch
/// for [`Backoff::settles_at`].
pub(crate) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Backoff {
    /// The next accepted connection, backing off while accepts fail; `None` once `stop`
    /// fires. Both accept loops (HTTP and control) go through here.
    pub(crate) async fn accept<T, F, Fut>(
        &mut self,
        stop: &CancellationToken,
        mut accept: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        loop {
            let mut next = std::pin::pin!(accept());
            let mut at_once = None;
            if self.trouble.is_some_and(|t| t.working_since.is_none()) {
                // After a failure, an accept that finds nothing waiting (rather than
                // failing again) means accepting works: counting only accepted
                // connections would leave the trouble open until the next client.
                match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                    Poll::Ready(accepted) => at_once = Some(accepted),
                    Poll::Pending => self.succeeded(),
                }
            }
            let accepted = match at_once {
                Some(accepted) => accepted,
                None => tokio::select! {
                    biased;
                    () = stop.cancelled() => return None,
                    () = until(self.settles_at()) => {
                        self.settle();
                        continue;
                    }
                    accepted = next.as_mut() => accepted,
                },
            };
            match accepted {
                Ok(conn) => {
                    self.succeeded();
                    return Some(conn);
                }
                Err(err) => tokio::select! {
                    biased;
                    () = stop.cancelled() => return None,
                    () = self.failed(&err) => {}
                },
            }
        }
    }
}

/// Admits at most `max` connections at once. When full, a new connection displaces the
/// oldest one still waiting for its request (a silent client cannot lock out one that
/// talks); only when every admitted connection has a request in hand is it refused.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    inner: Arc<Mutex<Slots>>,
}

#[derive(Debug)]
struct Slots {
    max: usize,
    next: u64,
    /// Connections still reading their request, oldest first; cancelled to evict.
    waiting: BTreeMap<u64, CancellationToken>,
    /// Connections whose request is being answered.
    busy: usize,
}

/// One admitted connection's place; gives it up when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    busy: bool,
    /// Cancelled if a newer connection takes this one's place while it still waits
    /// for its request.
    evicted: CancellationToken,
    admission: Admission,
}

impl Admission {
    /// Admits up to `max` connections at once.
    pub(crate) fn new(max: usize) -> Admission {
        Admission {
            inner: Arc::new(Mutex::new(Slots {
                max,
                next: 0,
                waiting: BTreeMap::new(),
                busy: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection, or `None` if every place is busy answering.
    pub(crate) fn admit(&self) -> Option<Slot> {
        let mut slots = self.lock();
        if slots.waiting.len() + slots.busy >= slots.max {
            let (_, oldest) = slots.waiting.pop_first()?;
            oldest.cancel();
        }
        let id = slots.next;
        slots.next += 1;
        let evicted = CancellationToken::new();
        slots.waiting.insert(id, evicted.clone());
        Some(Slot {
            id,
            busy: false,
            evicted,
            admission: self.clone(),
        })
    }
}

impl Slot {
    /// Resolves if a newer connection took this place while this one was waiting.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// Marks the request as read, so the place can no longer be taken; `false` if it
    /// already has been.
    pub(crate) fn start_work(&mut self) -> bool {
        let mut slots = self.admission.lock();
        if slots.waiting.remove(&self.id).is_none() {
            return false;
        }
        slots.busy += 1;
        self.busy = true;
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.admission.lock();
        if self.busy {
            slots.busy -= 1;
        } else {
            slots.waiting.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_settles_only_after_a_quiet_spell() {
        let mut b = Backoff::new("127.0.0.1:1");
        let t0 = Instant::now();
        assert_eq!(b.settles_at(), None);
        assert_eq!(b.end(), None, "no trouble, nothing to report");
        let pauses: Vec<_> = (0..12).map(|_| b.fail(t0).0).collect();
        assert_eq!(pauses[0], FIRST_DELAY);
        assert_eq!(pauses[1], FIRST_DELAY * 2);
        assert_eq!(pauses[11], MAX_DELAY);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(b.settles_at(), None, "still failing");
        let works = t0 + Duration::from_millis(3200);
        b.trouble.as_mut().unwrap().working_since = Some(works);
        assert_eq!(b.settles_at(), Some(works + QUIET));
        // One more failure at the limit continues the run: no new "cannot accept".
        assert_eq!(b.fail(works + QUIET / 2), (MAX_DELAY, false));
        assert_eq!(b.settles_at(), None);
        b.trouble.as_mut().unwrap().working_since = Some(works + QUIET);
        assert_eq!(b.end(), Some((13, Duration::from_millis(3200) + QUIET)));
        assert_eq!(
            b.fail(works),
            (FIRST_DELAY, true),
            "a new run starts afresh"
        );
    }

    #[tokio::test]
    async fn trouble_ends_when_nothing_waits_after_a_failure() {
        // One accept fails for lack of fds; after the pause nothing is waiting (the
        // connection went elsewhere). That is accepting working again: the trouble
        // must end without another client having to come.
        let stop = CancellationToken::new();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let mut backoff = Backoff::new("127.0.0.1:1");
        let accept = || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                match n {
                    0 => Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE)),
                    1 => std::future::pending().await,
                    // Called again only once the trouble has settled.
                    _ => {
                        stop.cancel();
                        std::future::pending().await
                    }
                }
            }
        };
        let done = tokio::time::timeout(Duration::from_secs(10), backoff.accept(&stop, accept));
        assert!(matches!(done.await, Ok(None)), "the trouble never ended");
        assert!(backoff.trouble.is_none());
    }

    #[test]
    fn per_connection_errors_are_told_apart_from_resource_errors() {
        assert!(is_per_connection(&io::ErrorKind::ConnectionAborted.into()));
        for errno in [24, 23, 105, 12] {
            // EMFILE, ENFILE, ENOBUFS, ENOMEM
            assert!(!is_per_connection(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn a_full_admission_evicts_the_oldest_waiter_and_refuses_when_all_are_busy() {
        let admission = Admission::new(2);
        let mut first = admission.admit().unwrap();
        let mut second = admission.admit().unwrap();
        let mut third = admission.admit().expect("displaces a waiter");
        assert!(first.evicted.is_cancelled(), "the oldest waiter goes");
        assert!(
            !first.start_work(),
            "an evicted connection cannot start work"
        );
        assert!(!second.evicted.is_cancelled());
        drop(first);
        assert!(second.start_work() && third.start_work());
        assert!(admission.admit().is_none(), "all busy: refused");
        drop(third);
        let fourth = admission.admit().expect("a place is free again");
        assert!(!fourth.evicted.is_cancelled());
    }
}
