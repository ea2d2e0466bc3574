//! The drain state machine shared by shutdown and the old side of a restart: stop
//! accepting, close idle connections after a grace, wait for in-flight requests, cut the
//! rest at `wait_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conns::{OpenSockets, TrackedStream};

/// Shared between the accept loops and the connection tasks of one server generation.
#[derive(Debug, Clone)]
pub struct DrainSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Flips to `true` once: from then on responses carry `Connection: close`.
    draining: AtomicBool,
    /// Who waits for the drain to begin ([`Draining`]): one waker per waiting future,
    /// registered once, so that polling it again (every time its connection task
    /// wakes) touches no lock or line shared with other connections.
    waiters: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    next_waiter: AtomicU64,
    /// Cancelled to stop every accept loop.
    stop_accepting: CancellationToken,
    /// Cancelled at `wait_timeout` to cut the connections still open.
    cut: CancellationToken,
    /// Requests currently inside the handler or having their body read (or streaming
    /// their response), in shards: each thread counts on its own cache line, so the
    /// serving threads never write the same one. Only the sum means anything.
    in_flight: [Shard; SHARDS],
    /// The open client connections' sockets: their count, and for the cut.
    sockets: OpenSockets,
    /// How long an idle keep-alive connection may linger once draining.
    idle_grace: Duration,
}

/// How a drain ended, for one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished by itself.
    Clean,
    /// `wait_timeout` passed; this many connections were cut.
    TimedOut {
        /// Connections closed while still open.
        cut: usize,
    },
}

/// How long cut connection tasks get to end by themselves before their sockets are
/// shut down under them.
const CUT_GRACE: Duration = Duration::from_millis(100);

/// Resolves once the drain begins: [`DrainSignal::draining`]. Cheap to poll again and
/// again (a connection task polls it whenever it wakes): after the first poll it only
/// touches a waker of its own.
#[derive(Debug)]
pub struct Draining<'a> {
    inner: &'a Inner,
    registered: Option<(u64, Arc<AtomicWaker>)>,
    /// The waker registered last.
    known: Option<std::task::Waker>,
}

impl Future for Draining<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.inner.draining.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        match &this.registered {
            // A task's waker stays the same from poll to poll: registered already.
            Some(_) if this.known.as_ref().is_some_and(|w| w.will_wake(cx.waker())) => {}
            Some((_, waker)) => {
                waker.register(cx.waker());
                this.known = Some(cx.waker().clone());
            }
            None => {
                let waker = Arc::new(AtomicWaker::new());
                waker.register(cx.waker());
                let id = this.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
                let mut waiters = this.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
                waiters.insert(id, waker.clone());
                drop(waiters);
                this.registered = Some((id, waker));
                this.known = Some(cx.waker().clone());
            }
        }
        // `begin` sets the flag before it wakes the registered: seen now, or woken.
        match this.inner.draining.load(Ordering::SeqCst) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registered.take() {
            let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.remove(&id);
        }
    }
}

/// Shards of the in-flight count.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(AtomicIsize);

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Counts a request as in flight for as long as it lives.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<Inner>,
    shard: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.inner.in_flight[self.shard]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as in flight for as long as it lives, borrowing the signal (no
/// reference count to touch).
#[derive(Debug)]
pub struct CountedRef<'a> {
    inner: &'a Inner,
    shard: usize,
}

impl Drop for CountedRef<'_> {
    fn drop(&mut self) {
        self.inner.in_flight[self.shard]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl DrainSignal {
    /// A fresh, not-draining signal.
    pub fn new(idle_grace: Duration) -> Self {
        DrainSignal {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                waiters: Mutex::default(),
                next_waiter: AtomicU64::new(0),
                stop_accepting: CancellationToken::new(),
                cut: CancellationToken::new(),
                in_flight: Default::default(),
                sockets: OpenSockets::default(),
                idle_grace,
            }),
        }
    }

    /// Starts the drain: accept loops stop, responses get `Connection: close`.
    pub fn begin(&self) {
        self.inner.stop_accepting.cancel();
        self.inner.draining.store(true, Ordering::SeqCst);
        let waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for waker in waiters.values() {
            waker.wake();
        }
    }

    /// Whether the drain has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Resolves once the drain begins.
    pub fn draining(&self) -> Draining<'_> {
        Draining {
            inner: &self.inner,
            registered: None,
            known: None,
        }
    }

    /// Resolves once accept loops must stop.
    pub fn stop_accepting(&self) -> &CancellationToken {
        &self.inner.stop_accepting
    }

    /// Resolves once remaining connections must be cut.
    pub fn cut(&self) -> &CancellationToken {
        &self.inner.cut
    }

    /// The idle grace.
    pub fn idle_grace(&self) -> Duration {
        self.inner.idle_grace
    }

    /// Marks one request as in flight until the guard drops.
    pub fn request(&self) -> Counted {
        let shard = shard();
        self.inner.in_flight[shard]
            .0
            .fetch_add(1, Ordering::Relaxed);
        Counted {
            inner: self.inner.clone(),
            shard,
        }
    }

    /// Marks one request as in flight until the guard drops; the guard borrows.
    pub fn request_ref(&self) -> CountedRef<'_> {
        let shard = shard();
        self.inner.in_flight[shard]
            .0
            .fetch_add(1, Ordering::Relaxed);
        CountedRef {
            inner: &self.inner,
            shard,
        }
    }

    /// Wraps a connection's socket, counting it as open until the wrapper drops, so
    /// the cut can shut it down from outside.
    pub fn track(&self, stream: tokio::net::TcpStream) -> TrackedStream {
        self.inner.sockets.track(stream)
    }

    /// Closes the connections whose next request head is `limit` late (see
    /// [`OpenSockets::limit_heads`]).
    pub fn limit_heads(&self, limit: Duration) {
        self.inner.sockets.limit_heads(limit);
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> usize {
        let sum: isize = self
            .inner
            .in_flight
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum();
        usize::try_from(sum).unwrap_or(0)
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        self.inner.sockets.len()
    }

    /// Waits for every tracked connection to finish, cutting them all at `deadline`.
    /// Returns one outcome per tracker, in order.
    pub async fn finish(
        &self,
        trackers: &[TaskTracker],
        deadline: tokio::time::Instant,
    ) -> Vec<DrainOutcome> {
        for t in trackers {
            t.close();
        }
        let all = futures_util::future::join_all(trackers.iter().map(TaskTracker::wait));
        if tokio::time::timeout_at(deadline, all).await.is_ok() {
            return vec![DrainOutcome::Clean; trackers.len()];
        }
        let outcomes = trackers
            .iter()
            .map(|t| match t.len() {
                0 => DrainOutcome::Clean,
                cut => DrainOutcome::TimedOut { cut },
            })
            .collect();
        self.inner.cut.cancel();
        // Cut connection tasks return at their next poll, except one stuck in a handler
        // running on its worker thread: shut its socket down under it, and go on.
        let all = futures_util::future::join_all(trackers.iter().map(TaskTracker::wait));
        if tokio::time::timeout(CUT_GRACE, all).await.is_err() {
            self.inner.sockets.shutdown_all();
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test]
    async fn finishes_as_soon_as_tasks_end_without_waiting_for_the_deadline() {
        let drain = DrainSignal::new(Duration::ZERO);
        let tracker = TaskTracker::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tracker.spawn(async move {
            let _ = rx.await;
        });
        drain.begin();
        assert!(drain.is_draining());
        assert!(drain.stop_accepting().is_cancelled());
        let finish = drain.finish(
            std::slice::from_ref(&tracker),
            Instant::now() + Duration::from_secs(3600),
        );
        tokio::pin!(finish);
        assert!(
            futures_util::poll!(finish.as_mut()).is_pending(),
            "must wait for the open task"
        );
        tx.send(()).unwrap();
        assert_eq!(finish.await, vec![DrainOutcome::Clean]);
        assert!(!drain.cut().is_cancelled());
    }

    #[tokio::test]
    async fn cuts_and_counts_what_is_left_at_the_deadline() {
        let drain = DrainSignal::new(Duration::ZERO);
        let busy = TaskTracker::new();
        let idle = TaskTracker::new();
        for _ in 0..3 {
            let cut = drain.cut().clone();
            busy.spawn(async move { cut.cancelled().await });
        }
        drain.begin();
        let outcomes = drain
            .finish(&[busy, idle], Instant::now() + Duration::from_millis(10))
            .await;
        assert_eq!(
            outcomes,
            vec![DrainOutcome::TimedOut { cut: 3 }, DrainOutcome::Clean]
        );
        assert!(drain.cut().is_cancelled());
    }

    #[tokio::test]
    async fn draining_wakes_every_waiter_and_forgets_dropped_ones() {
        let drain = DrainSignal::new(Duration::ZERO);
        let mut waiters: Vec<_> = (0..3)
            .map(|_| {
                let drain = drain.clone();
                tokio::spawn(async move { drain.draining().await })
            })
            .collect();
        let mut gone = Box::pin(drain.draining());
        assert!(futures_util::poll!(gone.as_mut()).is_pending());
        assert!(futures_util::poll!(gone.as_mut()).is_pending());
        drop(gone);
        tokio::task::yield_now().await;
        for w in &mut waiters {
            assert!(futures_util::poll!(w).is_pending());
        }
        drain.begin();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(drain.inner.waiters.lock().unwrap().len(), 0);
        drain.draining().await;
    }

    #[tokio::test]
    async fn in_flight_guard_counts() {
        let drain = DrainSignal::new(Duration::ZERO);
        let a = drain.request();
        let b = drain.request_ref();
        let moved = std::thread::spawn({
            let drain = drain.clone();
            move || drain.request()
        })
        .join()
        .unwrap();
        assert_eq!(drain.in_flight(), 3);
        drop(moved);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let c = drain.track(listener.accept().await.unwrap().0);
        assert_eq!(drain.in_flight(), 2);
        assert_eq!(drain.connections(), 1);
        drop(c);
        assert_eq!(drain.connections(), 0);
        drop(a);
        assert_eq!(drain.in_flight(), 1);
        drop(b);
        assert_eq!(drain.in_flight(), 0);
    }
}
