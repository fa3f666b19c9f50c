//! Event loops: threads that each serve a share of a server's connections on a single-threaded
//! runtime of their own, the way Netty binds each channel to one event loop.
//!
//! On tokio's work-stealing runtime a busy connection bounced between worker threads. Its task
//! is woken by its own request futures, by grouped commit-log writes and by its socket; a task
//! woken while it runs is queued again and an idle worker is notified, which then steals it.
//! With 64 producers on one connection that cost thousands of thread wake-ups a second and
//! about a quarter of the throughput. A connection pinned to one loop is woken on its own
//! thread, and different connections still use different cores.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stopping loop waits for its connections to close before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Work handed to a loop: runs on the loop's thread, inside its runtime.
type Job = Box<dyn FnOnce(&TaskTracker) + Send>;

/// The threads a server runs its connections on, or the caller's runtime.
pub struct EventLoops {
    loops: Vec<Loop>,
    /// Loops spinning now (for tests).
    #[cfg(test)]
    spinning: Arc<AtomicUsize>,
}

/// One loop thread, as seen from the accepting side.
struct Loop {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections handed to the loop and not yet finished: a new one goes to the loop with
    /// the fewest. Counted when handed over, so a burst of accepts is spread too.
    connections: Arc<AtomicUsize>,
    /// Fires (by being dropped) once the loop's runtime, and every connection on it, is gone.
    exited: oneshot::Receiver<()>,
    /// What its tasks wait for (the turns it spun, for tests).
    #[cfg(test)]
    awake: Arc<Awake>,
}

impl EventLoops {
    /// Starts `threads` loops named `name-0`, `name-1`, ...; each stops its connections and
    /// exits once `shutdown` fires. A loop whose task holds a [`StayAwake`] spins as `spin`
    /// allows instead of sleeping.
    pub fn start(
        name: &str,
        threads: usize,
        spin: Spin,
        shutdown: &CancellationToken,
    ) -> io::Result<Self> {
        let mut loops = Vec::with_capacity(threads);
        let spin = Arc::new(spin);
        let spinning = Arc::new(AtomicUsize::new(0));
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (jobs, mut inbox) = mpsc::unbounded_channel::<Job>();
            let (exit, exited) = oneshot::channel::<()>();
            let mine = TaskTracker::new();
            let stop = shutdown.clone();
            let awake = Arc::new(Awake::default());
            let spinner = Spinner {
                awake: awake.clone(),
                spin: spin.clone(),
                spinning: spinning.clone(),
            };
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        if !spinner.spin.limit.is_zero() && spinner.spin.max_loops > 0 {
                            AWAKE.with(|a| *a.borrow_mut() = Some(spinner.awake.clone()));
                            tokio::spawn(spinner.keep_awake());
                        }
                        loop {
                            tokio::select! {
                                biased;
                                _ = stop.cancelled() => break,
                                job = inbox.recv() => match job {
                                    Some(job) => job(&mine),
                                    None => break,
                                },
                            }
                        }
                        // Connections watch the same token: let them close their sockets.
                        // One that does not is dropped with the runtime after a grace.
                        mine.close();
                        let _ = tokio::time::timeout(STOP_GRACE, mine.wait()).await;
                    });
                    // Tasks they spawned (handed-off writes) run their drops here. A blocking
                    // read still running (a slave's cold chunk) is not waited for past a grace.
                    runtime.shutdown_timeout(STOP_GRACE);
                    drop(exit);
                })?;
            loops.push(Loop {
                jobs,
                connections: Arc::new(AtomicUsize::new(0)),
                exited,
                #[cfg(test)]
                awake,
            });
        }
        Ok(EventLoops {
            loops,
            #[cfg(test)]
            spinning,
        })
    }

    /// No threads of its own: connections run as tasks on the caller's runtime (for servers
    /// with little traffic, such as the name server, and for tests).
    pub fn current() -> Self {
        EventLoops {
            loops: Vec::new(),
            #[cfg(test)]
            spinning: Arc::default(),
        }
    }

    /// Number of loop threads (0 when connections run on the caller's runtime).
    pub fn threads(&self) -> usize {
        self.loops.len()
    }

    /// Runs `serve(socket, placement)` on the loop with the fewest connections; the
    /// connection counts there until it ends or gives up its `placement`.
    pub fn spawn<F, Fut>(&self, socket: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream, Placement) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let target = self
            .loops
            .iter()
            .min_by_key(|l| l.connections.load(Ordering::Relaxed));
        hand_over(
            target.map(|l| (&l.jobs, Some(&l.connections))),
            socket,
            serve,
        );
    }

    /// A handle that places connections on the first loop without counting them, so the
    /// first client connection joins them there (see `FirstLoop`).
    pub fn first_loop(&self) -> FirstLoop {
        FirstLoop(self.loops.first().map(|l| l.jobs.clone()))
    }

    /// Waits until every loop has stopped and dropped its connections. While a `FirstLoop`
    /// handle lives, the first loop stops only through the shutdown token.
    pub async fn join(self) {
        for l in self.loops {
            drop(l.jobs);
            let _ = l.exited.await;
        }
    }
}

/// Places connections on a server's first event loop, uncounted: replication connections,
/// whose work is driven by the sends of the client connections that share that loop. It
/// holds the loop's job queue open: drop it before relying on `EventLoops::join` alone.
#[derive(Clone)]
pub struct FirstLoop(Option<mpsc::UnboundedSender<Job>>);

impl FirstLoop {
    /// Runs `serve(socket)` on the first loop (on the caller's runtime without loops).
    pub fn spawn<F, Fut>(&self, socket: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        hand_over(self.0.as_ref().map(|j| (j, None)), socket, |s, _| serve(s));
    }
}

/// A connection's share of its loop's count, which places new connections. A connection that
/// turns out not to be a client's (a slave copying its master's topics and offsets every
/// second) gives it up, so the next client connection is placed as if it were not there: on
/// the first loop, a client's sends then wake replication without a hop between threads.
#[derive(Clone, Default)]
pub struct Placement(Arc<Mutex<Option<Counted>>>);

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counted = self.0.lock().is_ok_and(|c| c.is_some());
        f.debug_tuple("Placement").field(&counted).finish()
    }
}

impl Placement {
    fn counted(count: Option<&Arc<AtomicUsize>>) -> Self {
        Placement(Arc::new(Mutex::new(count.map(Counted::new))))
    }

    /// Stops counting the connection when placing new ones.
    pub fn release(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Moves `socket` to the loop behind `target` (its jobs, and the count to hold while the
/// connection lives) and serves it there; without a target, serves it on the caller's runtime.
fn hand_over<F, Fut>(
    target: Option<(&mpsc::UnboundedSender<Job>, Option<&Arc<AtomicUsize>>)>,
    socket: TcpStream,
    serve: F,
) where
    F: FnOnce(TcpStream, Placement) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some((jobs, count)) = target else {
        tokio::spawn(serve(socket, Placement::default()));
        return;
    };
    // The socket is registered with the accepting runtime's reactor: move it out, and
    // register it again with the loop's.
    let socket = match socket.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hand a connection to its event loop");
            return;
        }
    };
    let placement = Placement::counted(count);
    let job: Job = Box::new(move |tasks| match TcpStream::from_std(socket) {
        Ok(socket) => {
            let served = serve(socket, placement.clone());
            tasks.spawn(async move {
                served.await;
                placement.release();
            });
        }
        Err(e) => tracing::warn!(error = %e, "event loop cannot register a connection"),
    });
    if jobs.send(job).is_err() {
        tracing::debug!("event loop already stopped; connection dropped");
    }
}

/// Holds one unit of a count for as long as it lives (a loop's connections, a server's
/// requests in flight).
pub(super) struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub(super) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a server's loops may stay awake for answers due soon (see [`StayAwake`]).
#[derive(Clone, Debug, Default)]
pub struct Spin {
    /// Longest a loop spins for the next answer to a wait on it (zero: loops always sleep).
    pub limit: Duration,
    /// Loops that may spin at the same time: with one per core, a spinning loop would take
    /// the core the flush thread, the kernel's write-back or a slave needs.
    pub max_loops: usize,
    /// Wall time the loops have spent spinning, their work between turns included.
    pub spent: Counter<f64, AtomicU64>,
}

impl Spin {
    /// Spinning up to `limit`, on all cores but one (none on a single core).
    pub fn new(limit: Duration) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Spin {
            limit,
            max_loops: cores.saturating_sub(1),
            spent: Counter::default(),
        }
    }
}

/// What a loop's tasks wait for, shared with the task that keeps the loop awake.
#[derive(Default)]
struct Awake {
    /// Tasks on the loop holding a [`StayAwake`].
    waiting: AtomicUsize,
    /// Waits ended so far: each answer taken up extends the spinning.
    ended: AtomicU64,
    /// Signalled when a wait begins.
    wanted: tokio::sync::Notify,
    /// Turns spun so far (the time spun is tallied every `TALLY_EVERY`; tests read it).
    turns: AtomicU64,
}

thread_local! {
    /// The loop this thread runs, when it is a loop that may stay awake.
    static AWAKE: RefCell<Option<Arc<Awake>>> = const { RefCell::new(None) };
}

/// Held by a task waiting for an answer due within microseconds (a group commit from the
/// flush thread, a slave's acknowledgement): the loop keeps running instead of sleeping, so
/// the answer is taken up at once. On a virtual machine a sleeping CPU takes tens of
/// microseconds to wake, a tenth to a fifth of a SYNC_FLUSH or SYNC_MASTER send.
#[must_use = "the loop stays awake only while this is held"]
pub struct StayAwake(Option<Arc<Awake>>);

impl StayAwake {
    /// Marks the current task as waiting; has no effect off a loop that may stay awake.
    pub fn begin() -> Self {
        let awake = AWAKE.with(|a| a.borrow().clone());
        if let Some(a) = &awake {
            a.waiting.fetch_add(1, Ordering::Relaxed);
            // Wakes the spinner from this thread, no system call; while it spins, this only
            // leaves a permit.
            a.wanted.notify_one();
        }
        StayAwake(awake)
    }
}

impl Drop for StayAwake {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.ended.fetch_add(1, Ordering::Relaxed);
            a.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How many limits' worth of time a loop sleeps through after its waits went a whole limit
/// without an answer: behind a slow disk or slave, spinning would burn a core for nothing.
/// It tries again after.
const SIT_OUT: u32 = 7;

/// Turns a spell makes before it may end for want of answers: 61 turns (tokio's
/// `event_interval`) bring one poll of the sockets, so a loop that was preempted for longer
/// than the limit first takes up what arrived meanwhile.
const MIN_TURNS: u64 = 64;

/// Turns between two additions to the time spun (so the metric rises steadily).
const TALLY_EVERY: u64 = 1024;

/// The task that keeps one loop awake.
struct Spinner {
    awake: Arc<Awake>,
    spin: Arc<Spin>,
    /// Loops of the server spinning now.
    spinning: Arc<AtomicUsize>,
}

/// Counts a loop among the spinning ones (or trying to be) while it lives.
struct Spinning<'a>(&'a AtomicUsize);

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spinner {
    /// Keeps the loop from sleeping while any of its tasks holds a [`StayAwake`] and answers
    /// keep coming: the spell ends when no wait has ended for `limit`. Each turn hands control
    /// back to the scheduler, which polls its sockets and timers every 61 turns (tokio's
    /// `event_interval`) and its queue of wake-ups from other threads every 31, so the loop's
    /// connections are served as usual. A loop refused a place (the cap) or sitting out tries
    /// again at the next wait that begins.
    async fn keep_awake(self) {
        let (awake, spin) = (&self.awake, &self.spin);
        let mut sit_out_until: Option<Instant> = None;
        loop {
            awake.wanted.notified().await;
            if awake.waiting.load(Ordering::Relaxed) == 0 {
                continue;
            }
            if sit_out_until.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let others = self.spinning.fetch_add(1, Ordering::Relaxed);
            let counted = Spinning(&self.spinning);
            if others >= spin.max_loops {
                continue;
            }
            let mut tallied = Instant::now();
            let mut since = tallied;
            let mut ended = awake.ended.load(Ordering::Relaxed);
            // Turns since the last answer.
            let mut turns = 0u64;
            let unanswered = loop {
                if awake.waiting.load(Ordering::Relaxed) == 0 {
                    break false;
                }
                let now = Instant::now();
                let latest = awake.ended.load(Ordering::Relaxed);
                if latest != ended {
                    (ended, since, turns) = (latest, now, 0);
                } else if turns >= MIN_TURNS && now.saturating_duration_since(since) >= spin.limit {
                    break true;
                }
                turns += 1;
                if awake
                    .turns
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(TALLY_EVERY)
                {
                    spin.spent
                        .inc_by(now.saturating_duration_since(tallied).as_secs_f64());
                    tallied = now;
                }
                Turn(false).await;
            };
            drop(counted);
            spin.spent.inc_by(tallied.elapsed().as_secs_f64());
            sit_out_until = unanswered.then(|| Instant::now() + spin.limit * SIT_OUT);
        }
    }
}

/// Yields once to the loop's scheduler by waking itself: the task is queued again behind
/// the tasks already ready. `tokio::task::yield_now` would instead wait for the next poll of
/// the reactor, which the scheduler then makes at once when nothing else is ready: an
/// `epoll_wait` system call per turn instead of one per 61.
struct Turn(bool);

impl Future for Turn {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Accepts `n` connections and hands them to `loops`; each answers one byte with the
    /// name of the thread serving it, then stays open until the client goes or `stop` fires.
    async fn serve_n(
        loops: &EventLoops,
        listener: &TcpListener,
        n: usize,
        stop: &CancellationToken,
    ) {
        for _ in 0..n {
            let (socket, _) = listener.accept().await.unwrap();
            let stop = stop.clone();
            loops.spawn(socket, |s, _| answer_thread_name(s, stop));
        }
    }

    /// Answers one byte with the name of the thread serving `s`, then stays open (so its loop
    /// counts it) until the client goes or `stop` fires.
    async fn answer_thread_name(mut s: TcpStream, stop: CancellationToken) {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_ok() {
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = s.write_all(name.as_bytes()).await;
            let _ = s.shutdown().await;
        }
        tokio::select! {
            _ = s.read(&mut b) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Loops that may spin for up to `limit`, `max_loops` at a time.
    fn spinning_loops(threads: usize, limit: Duration, max_loops: usize) -> (EventLoops, Spin) {
        let spin = Spin {
            limit,
            max_loops,
            spent: Counter::default(),
        };
        let loops = EventLoops::start("test-io", threads, spin.clone(), &CancellationToken::new());
        (loops.unwrap(), spin)
    }

    /// Runs `fut` as a task on loop `i`.
    fn run_on(loops: &EventLoops, i: usize, fut: impl Future<Output = ()> + Send + 'static) {
        let job: Job = Box::new(move |tasks| {
            tasks.spawn(fut);
        });
        assert!(loops.loops[i].jobs.send(job).is_ok(), "loop {i} is gone");
    }

    fn turns(loops: &EventLoops, i: usize) -> u64 {
        loops.loops[i].awake.turns.load(Ordering::Relaxed)
    }

    /// A task on a loop holding a [`StayAwake`] until released (or dropped).
    struct Held {
        release: oneshot::Sender<()>,
        dropped: oneshot::Receiver<()>,
    }

    impl Held {
        async fn release(self) {
            let _ = self.release.send(());
            let dropped = tokio::time::timeout(Duration::from_secs(5), self.dropped).await;
            assert!(dropped.is_ok(), "the held task did not end");
        }
    }

    /// Starts a task on loop `i` that holds a [`StayAwake`]; returns once it does.
    async fn hold(loops: &EventLoops, i: usize) -> Held {
        let (held_tx, held) = oneshot::channel();
        let (release, release_rx) = oneshot::channel::<()>();
        let (dropped_tx, dropped) = oneshot::channel();
        run_on(loops, i, async move {
            let awake = StayAwake::begin();
            let _ = held_tx.send(());
            let _ = release_rx.await;
            drop(awake);
            let _ = dropped_tx.send(());
        });
        let started = tokio::time::timeout(Duration::from_secs(5), held).await;
        assert!(started.is_ok(), "the task on loop {i} did not start");
        Held { release, dropped }
    }

    /// Waits (up to 5 s) until loop `i` has spun past `before` turns.
    async fn spun_past(loops: &EventLoops, i: usize, before: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while turns(loops, i) <= before {
            assert!(Instant::now() < deadline, "loop {i} does not spin");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (up to 5 s) until no loop spins.
    async fn idle(loops: &EventLoops) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while loops.spinning.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "a loop spins on");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (up to 5 s) until loop `i` holds still for 50 ms.
    async fn resting(loops: &EventLoops, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = turns(loops, i);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if turns(loops, i) == before {
                return;
            }
            assert!(Instant::now() < deadline, "loop {i} spins on");
        }
    }

    #[tokio::test]
    async fn a_loop_spins_only_while_a_task_waits_and_serves_sockets_and_timers_meanwhile() {
        let (loops, spin) = spinning_loops(1, Duration::from_secs(30), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(turns(&loops, 0), 0, "spun with nothing waiting");

        let held = hold(&loops, 0).await;
        spun_past(&loops, 0, 0).await;
        // A timer on the spinning loop fires, and a connection on it is served.
        let (fired_tx, fired) = oneshot::channel();
        run_on(&loops, 0, async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = fired_tx.send(());
        });
        tokio::time::timeout(Duration::from_secs(5), fired)
            .await
            .expect("a timer fires while the loop spins")
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(connect_and_ask(addr, 1));
        let stop = CancellationToken::new();
        serve_n(&loops, &listener, 1, &stop).await;
        let (names, _open) = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .expect("a connection is served while the loop spins")
            .unwrap();
        assert_eq!(names, ["test-io-0"]);
        // And it spins on while the task waits.
        spun_past(&loops, 0, turns(&loops, 0)).await;

        held.release().await;
        idle(&loops).await;
        resting(&loops, 0).await;
        assert!(spin.spent.get() > 0.0, "the time spun is counted");
        // A later wait makes it spin again.
        let held = hold(&loops, 0).await;
        spun_past(&loops, 0, turns(&loops, 0)).await;
        held.release().await;
        resting(&loops, 0).await;
        stop.cancel();
    }

    #[tokio::test]
    async fn spinning_lasts_while_answers_come_then_stops_though_a_task_still_waits() {
        let limit = Duration::from_secs(1);
        let (loops, _) = spinning_loops(1, limit, 1);
        let mut first = hold(&loops, 0).await;
        spun_past(&loops, 0, 0).await;
        // Other waits begin and end every 20 ms: each answer extends the spinning.
        let more = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let going = more.clone();
        run_on(&loops, 0, async move {
            while going.load(Ordering::Relaxed) {
                let awake = StayAwake::begin();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(awake);
            }
        });
        tokio::time::sleep(limit + Duration::from_millis(200)).await;
        spun_past(&loops, 0, turns(&loops, 0)).await;
        // No answer for the limit: it stops, though the first task still waits.
        more.store(false, Ordering::Relaxed);
        idle(&loops).await;
        resting(&loops, 0).await;
        assert!(
            first.dropped.try_recv().is_err(),
            "the first task stopped waiting"
        );
    }

    #[tokio::test]
    async fn after_a_wait_goes_unanswered_the_loop_sits_out_then_spins_again() {
        let limit = Duration::from_millis(200);
        let (loops, _) = spinning_loops(1, limit, 1);
        let slow = hold(&loops, 0).await;
        spun_past(&loops, 0, 0).await;
        idle(&loops).await;
        slow.release().await;
        // Waits beginning in the next seven limits find the loop sleeping...
        let asleep_until = Instant::now() + limit * SIT_OUT;
        let before = turns(&loops, 0);
        let held = hold(&loops, 0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            turns(&loops, 0),
            before,
            "spun right after a wait went unanswered"
        );
        held.release().await;
        // ...and one after them spins again.
        tokio::time::sleep_until((asleep_until + Duration::from_millis(100)).into()).await;
        let held = hold(&loops, 0).await;
        spun_past(&loops, 0, before).await;
        held.release().await;
    }

    #[tokio::test]
    async fn no_more_loops_spin_at_once_than_allowed() {
        let (loops, _) = spinning_loops(2, Duration::from_secs(30), 1);
        let first = hold(&loops, 0).await;
        spun_past(&loops, 0, 0).await;
        let second = hold(&loops, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(turns(&loops, 1), 0, "a second loop spun");
        first.release().await;
        idle(&loops).await;
        // The next wait beginning there may spin.
        let third = hold(&loops, 1).await;
        spun_past(&loops, 1, 0).await;
        third.release().await;
        second.release().await;
    }

    #[tokio::test]
    async fn loops_without_a_limit_never_spin() {
        let (loops, _) = spinning_loops(1, Duration::ZERO, 1);
        let held = hold(&loops, 0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(turns(&loops, 0), 0);
        held.release().await;
        // Off a loop, the guard does nothing.
        assert!(StayAwake::begin().0.is_none());
    }

    async fn ask(client: &mut TcpStream) -> String {
        client.write_all(b"?").await.unwrap();
        let mut name = String::new();
        client.read_to_string(&mut name).await.unwrap();
        name
    }

    /// Opens `n` connections to `addr` one after another, asking each its thread's name; keeps
    /// them open.
    async fn connect_and_ask(
        addr: std::net::SocketAddr,
        n: usize,
    ) -> (Vec<String>, Vec<TcpStream>) {
        let mut names = Vec::new();
        let mut open = Vec::new();
        for _ in 0..n {
            let mut c = TcpStream::connect(addr).await.unwrap();
            names.push(ask(&mut c).await);
            open.push(c);
        }
        (names, open)
    }

    #[tokio::test]
    async fn connections_spread_over_loops_and_stop_with_the_token() {
        let stop = CancellationToken::new();
        let loops = EventLoops::start("test-io", 2, Spin::default(), &stop).unwrap();
        assert_eq!(loops.threads(), 2);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = tokio::spawn(connect_and_ask(addr, 4));
        serve_n(&loops, &listener, 4, &stop).await;
        let (mut names, open) = clients.await.unwrap();
        names.sort();
        // Each new connection went to the loop with fewer: two each.
        assert_eq!(names, ["test-io-0", "test-io-0", "test-io-1", "test-io-1"]);

        // Shutdown ends the loops even with connections still open.
        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), loops.join())
            .await
            .expect("loops stop on shutdown");
        drop(open);
    }

    /// Hands the first connection to `place`, then two more to the loops as usual, and checks
    /// the first did not count: the second joins it on the first loop, the third goes on.
    async fn first_connection_uncounted(
        place: impl FnOnce(&EventLoops, TcpStream, CancellationToken),
    ) {
        let stop = CancellationToken::new();
        let loops = EventLoops::start("test-io", 2, Spin::default(), &stop).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let clients = tokio::spawn(connect_and_ask(addr, 3));
        let (socket, _) = listener.accept().await.unwrap();
        place(&loops, socket, stop.clone());
        serve_n(&loops, &listener, 2, &stop).await;
        let (names, open) = clients.await.unwrap();
        assert_eq!(names, ["test-io-0", "test-io-0", "test-io-1"]);
        stop.cancel();
        loops.join().await;
        drop(open);
    }

    #[tokio::test]
    async fn the_first_loop_takes_uncounted_connections() {
        // The first connection stands for a replication connection: first loop, not counted.
        first_connection_uncounted(|loops, socket, stop| {
            loops
                .first_loop()
                .spawn(socket, |socket| answer_thread_name(socket, stop));
        })
        .await;
    }

    #[tokio::test]
    async fn a_connection_that_gives_up_its_placement_is_not_counted() {
        // The first connection stands for a slave's: it gives up its place at once.
        first_connection_uncounted(|loops, socket, stop| {
            loops.spawn(socket, |socket, placement| async move {
                placement.release();
                answer_thread_name(socket, stop).await
            });
        })
        .await;
    }

    #[tokio::test]
    async fn without_threads_connections_run_on_the_callers_runtime() {
        let loops = EventLoops::current();
        assert_eq!(loops.threads(), 0);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            ask(&mut c).await
        });
        serve_n(&loops, &listener, 1, &CancellationToken::new()).await;
        let name = client.await.unwrap();
        assert!(!name.starts_with("test-io"), "served on {name}");
        loops.join().await;
    }
}
