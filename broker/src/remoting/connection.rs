//! Connections: the server side (accept loop, one reader and one writer task per socket,
//! requests processed concurrently) and the client side (request/response matched by opaque).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Encoder, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::event_loop::{Counted, EventLoops, Placement};
use super::{FrameCodec, RemotingCommand, RemotingError, ResponseCode, SerializeType};

/// Requests a connection may have in flight before the server stops reading from it.
const MAX_IN_FLIGHT_PER_CONNECTION: usize = 4096;
/// Commands other tasks may queue for a connection (pushes to the client).
const WRITE_QUEUE: usize = 1024;

/// Encoded answers a connection may hold unwritten before it stops reading requests.
const MAX_UNWRITTEN: usize = 4 << 20;

/// Frames a connection decodes before it writes the answers it has.
const READS_PER_WRITE: usize = 32;

/// How long reading stays paused for answers that do not come.
const STALL: Duration = Duration::from_millis(1);

/// How long a connection whose client stopped sending still runs and answers its requests.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

/// Requests a client connection encodes before it must write them out.
const WRITE_BATCH: usize = 256 * 1024;

/// Read buffer per connection: dozens of 1 KiB frames per read system call (the default
/// 8 KiB took one call per five sends under load).
const READ_BUFFER: usize = 64 * 1024;

/// What a request processor knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// Pushes a command (e.g. a oneway notification) to this client.
    pub push: mpsc::Sender<RemotingCommand>,
    /// Requests this server sent the client and waits to have answered.
    calls: Arc<Calls>,
    /// Requests being handled by this server, across all connections.
    busy: Arc<AtomicUsize>,
    /// The connection's share of its event loop's count.
    placement: Placement,
}

impl Peer {
    /// Whether other requests than the caller's are being handled right now: a hint that
    /// waiting a scheduler turn lets work be shared (one write for many sends).
    pub fn others_in_flight(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 1
    }

    /// Marks the connection as another broker's (a slave syncing from its master), not a
    /// client's: new client connections are spread over the event loops as if it were not
    /// there.
    pub fn not_a_client(&self) {
        self.placement.release();
    }

    /// A handle to reach this client later, from any task: pushes, and calls that wait for
    /// the client's answer.
    pub fn link(&self) -> ClientLink {
        ClientLink {
            push: self.push.clone(),
            calls: self.calls.clone(),
        }
    }

    /// Hands a client's answer to the call waiting for it (tests stand in for a connection).
    #[cfg(test)]
    pub(crate) fn answered(&self, response: RemotingCommand) {
        self.calls.answer(response);
    }
}

/// Why a call from this server to a client got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The client's connection closed before it answered.
    #[error("the client's connection closed")]
    Closed,
    /// The connection's queue of commands to write stayed full.
    #[error("the client's connection is too busy to take the request")]
    Busy,
    /// No answer within the time allowed.
    #[error("the client did not answer within {0:?}")]
    Timeout(Duration),
}

/// Calls made to one client, matched to its answers by opaque (as the client matches ours).
#[derive(Debug, Default)]
struct Calls {
    /// The last opaque given; calls use 1 and up (pushes that expect no answer carry 0).
    last: AtomicI32,
    waiting: Mutex<Waiting>,
}

/// Calls waiting for their answers, until the connection can no longer bring any.
#[derive(Debug, Default)]
struct Waiting {
    closed: bool,
    calls: HashMap<i32, oneshot::Sender<RemotingCommand>>,
}

impl Calls {
    /// Registers a call; `None` once the connection can bring no answer.
    fn register(&self) -> Option<(i32, oneshot::Receiver<RemotingCommand>)> {
        let opaque = match self.last.fetch_add(1, Ordering::Relaxed).wrapping_add(1) {
            0 => 1, // after wrapping around: 0 is the pushes'
            n => n,
        };
        let (tx, rx) = oneshot::channel();
        let mut w = lock(&self.waiting);
        if w.closed {
            return None;
        }
        w.calls.insert(opaque, tx);
        Some((opaque, rx))
    }

    /// Delivers an answer read from the connection; answers nobody waits for (oneway pushes,
    /// calls given up) are dropped.
    fn answer(&self, response: RemotingCommand) {
        if let Some(w) = lock(&self.waiting).calls.remove(&response.opaque) {
            let _ = w.send(response);
        }
    }

    /// Fails every waiting call and any later one: the connection can bring no answer.
    fn close(&self) {
        let mut w = lock(&self.waiting);
        w.closed = true;
        w.calls.clear();
    }
}

/// Closes a connection's calls when its task ends, however it ends.
struct CloseOnDrop(Arc<Calls>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Reaches one client from anywhere in the server, as long as its connection lives.
#[derive(Clone, Debug)]
pub struct ClientLink {
    /// Queues a command (a oneway notification) for the connection to write.
    pub push: mpsc::Sender<RemotingCommand>,
    calls: Arc<Calls>,
}

impl ClientLink {
    /// Whether the client's connection has closed.
    pub fn is_closed(&self) -> bool {
        self.push.is_closed()
    }

    /// Sends `request` to the client and waits up to `timeout`, in all, for its answer
    /// (whatever its code), as Java's broker calls a client (`invokeSync`).
    pub async fn call(
        &self,
        mut request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let Some((opaque, rx)) = self.calls.register() else {
            return Err(CallError::Closed);
        };
        request.opaque = opaque;
        request.flag &= !(super::command::FLAG_ONEWAY | super::command::FLAG_RESPONSE);
        // However the call ends, its registration goes.
        let _forget = Forget(&self.calls, opaque);
        match tokio::time::timeout_at(deadline, self.push.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(CallError::Closed),
            Err(_) => return Err(CallError::Busy),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }
}

/// Removes a call's registration when the call ends.
struct Forget<'a>(&'a Calls, i32);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.0.waiting).calls.remove(&self.1);
    }
}

#[cfg(test)]
impl Peer {
    /// A peer with no connection behind it (pushes to it go nowhere), for processors under
    /// test.
    pub(crate) fn detached(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            push: mpsc::channel(1).0,
            calls: Arc::default(),
            busy: Arc::default(),
            placement: Placement::default(),
        }
    }
}

/// Answers requests: the name server and the broker each implement it once.
pub trait Processor: Send + Sync + 'static {
    /// Handles one request; `None` means no response (oneway requests).
    fn process(
        &self,
        request: RemotingCommand,
        peer: &Peer,
    ) -> impl Future<Output = Option<RemotingCommand>> + Send;

    /// Called once when a connection closes, so client registrations can be dropped.
    fn disconnected(&self, _peer: &Peer) {}
}

/// Accepts connections on `listener` until `shutdown` fires, serving each with `processor` on
/// one of `loops`; returns once the loops have stopped (with them, their connections).
pub async fn serve<P: Processor>(
    listener: TcpListener,
    processor: Arc<P>,
    max_frame: usize,
    shutdown: CancellationToken,
    loops: EventLoops,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, addr)) => {
                let _ = socket.set_nodelay(true);
                let addr = crate::net::canonical(addr);
                let p = processor.clone();
                let stop = shutdown.clone();
                let busy = busy.clone();
                loops.spawn(socket, move |socket, placement| {
                    serve_connection(socket, addr, p, max_frame, stop, busy, placement)
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    loops.join().await;
}

async fn serve_connection<P: Processor>(
    socket: TcpStream,
    addr: SocketAddr,
    processor: Arc<P>,
    max_frame: usize,
    shutdown: CancellationToken,
    busy: Arc<AtomicUsize>,
    placement: Placement,
) {
    let (rd, mut wr) = socket.into_split();
    let mut reader = FramedRead::with_capacity(rd, FrameCodec::new(max_frame), READ_BUFFER);
    let (tx, mut pushes) = mpsc::channel::<RemotingCommand>(WRITE_QUEUE);
    let calls = Arc::<Calls>::default();
    // However the connection ends (even cancelled), calls waiting on it fail at once.
    let _fail_calls = CloseOnDrop(calls.clone());
    let peer = Peer {
        addr,
        push: tx,
        calls,
        busy,
        placement,
    };
    // One task serves the whole connection: it reads, runs the requests concurrently (no task
    // per request), and writes. It runs on one event loop (see `event_loop`), so its work stays
    // on one thread. Requests that wait (long polls, SYNC_FLUSH, SYNC_MASTER) still overlap,
    // and different connections run on different loops.
    //
    // The branches are tried in order: every frame already received is decoded first, then
    // every request that can finish does, and only then are the encoded answers written, so
    // concurrent sends share one commit-log write and their answers share one socket write.
    let mut requests = FuturesUnordered::new();
    let mut codec = FrameCodec::new(usize::MAX);
    // Grows with the answers waiting to be written (an idle connection holds nothing).
    let mut out = BytesMut::new();
    // Frames read since the last write: a client that never pauses must still get answers.
    let mut read_since_write = 0usize;
    // Set when the client stops sending: what it asked is still answered, for a while.
    let mut closing: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Armed when reading pauses for answers that do not come (pulls waiting for messages):
    // reading resumes when it fires.
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if closing.is_some() && requests.is_empty() && out.is_empty() {
            break;
        }
        if read_since_write >= READS_PER_WRITE && out.is_empty() && stalled.is_none() {
            stalled = Some(Box::pin(tokio::time::sleep(STALL)));
        }
        let reading = closing.is_none()
            && requests.len() < MAX_IN_FLIGHT_PER_CONNECTION
            && out.len() < MAX_UNWRITTEN
            && read_since_write < READS_PER_WRITE;
        let answer = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = async { closing.as_mut()?.await; Some(()) }, if closing.is_some() => break,
            next = reader.next(), if reading => match next {
                None => {
                    closing = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                    // A client that stopped sending will not answer our calls either.
                    peer.calls.close();
                    continue;
                }
                Some(Ok(request)) => {
                    if request.is_response() {
                        // An answer to one of our calls; answers to oneway pushes carry
                        // nothing we need and are dropped. No answer of ours is owed.
                        peer.calls.answer(request);
                        continue;
                    }
                    read_since_write += 1;
                    let handling = Counted::new(&peer.busy);
                    let (processor, peer) = (&*processor, &peer);
                    let code = request.code;
                    // Boxed once here: the handler's state is large (1.7 KB), and the
                    // wrappers below and the set's own task would each copy it again.
                    let run = Box::pin(async move {
                        let oneway = request.is_oneway();
                        let response = processor.process(request, peer).await;
                        drop(handling);
                        response.filter(|_| !oneway)
                    });
                    // A bug in one request must not take the connection's other requests down.
                    requests.push(AssertUnwindSafe(run).catch_unwind().map(move |r| {
                        r.unwrap_or_else(|_| {
                            tracing::error!(peer = %addr, code, "request handler panicked");
                            None
                        })
                    }));
                    continue;
                }
                Some(Err(e)) => {
                    // A client that went away (reset) is routine; anything else is a bad frame.
                    if matches!(&e, RemotingError::Io(io) if matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)) {
                        tracing::debug!(peer = %addr, error = %e, "connection reset by the client");
                    } else {
                        tracing::warn!(peer = %addr, error = %e, "closing connection after a bad frame");
                    }
                    break;
                }
            },
            Some(answer) = requests.next(), if !requests.is_empty() => answer,
            // Pushes wait while the client reads too slowly, like answers: a client that stops
            // reading must not grow the broker's memory with what is pushed to it.
            Some(push) = pushes.recv(), if out.len() < MAX_UNWRITTEN => Some(push),
            written = wr.write_buf(&mut out), if !out.is_empty() => {
                read_since_write = 0;
                stalled = None;
                match written {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            // Reading paused for answers that are slow to come: read on.
            _ = async { stalled.as_mut()?.await; Some(()) }, if stalled.is_some() => {
                read_since_write = 0;
                stalled = None;
                continue;
            }
        };
        match answer {
            Some(cmd) => {
                if let Err(e) = codec.encode(cmd, &mut out) {
                    tracing::warn!(peer = %addr, error = %e, "cannot encode an answer; closing");
                    break;
                }
            }
            // A oneway request finished: no answer will be written for the frame it came in.
            None => read_since_write = read_since_write.saturating_sub(1),
        }
    }
    // Requests still running are dropped with the connection: their answers have nowhere to
    // go, and the store's operations complete or roll back on cancellation.
    drop(requests);
    processor.disconnected(&peer);
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The connection broke before the response came.
    #[error("connection to {0} closed")]
    Closed(String),
    /// No response within the timeout.
    #[error("no response from {addr} within {timeout:?}")]
    Timeout {
        /// Address called.
        addr: String,
        /// Time waited.
        timeout: Duration,
    },
    /// The server answered with an error code.
    #[error("{addr} answered code {code}: {remark}")]
    Response {
        /// Address called.
        addr: String,
        /// Response code.
        code: i32,
        /// Server's explanation.
        remark: String,
    },
    /// A response could not be understood.
    #[error("bad response from {addr}: {detail}")]
    BadResponse {
        /// Address called.
        addr: String,
        /// What was wrong.
        detail: String,
    },
    /// The frame layer failed.
    #[error(transparent)]
    Remoting(#[from] RemotingError),
}

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<RemotingCommand>>>>;

/// One client connection; requests may be issued concurrently from many tasks.
pub struct Connection {
    addr: String,
    tx: mpsc::Sender<RemotingCommand>,
    pending: Pending,
    next_opaque: AtomicI32,
    closed: CancellationToken,
}

impl Connection {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str) -> Result<Arc<Connection>, ClientError> {
        let socket = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = socket.set_nodelay(true);
        let (rd, wr) = socket.into_split();
        let (tx, mut rx) = mpsc::channel::<RemotingCommand>(WRITE_QUEUE);
        let pending: Pending = Arc::default();
        let closed = CancellationToken::new();
        let conn = Arc::new(Connection {
            addr: addr.to_string(),
            tx,
            pending: pending.clone(),
            next_opaque: AtomicI32::new(1),
            closed: closed.clone(),
        });
        let closed_w = closed.clone();
        let pending_w = pending.clone();
        tokio::spawn(async move {
            let mut w = FramedWrite::new(wr, FrameCodec::new(usize::MAX));
            // The default (8 KiB) flushed every five 1 KiB sends: one system call each, and
            // on loopback the sender's call also runs the receiver's TCP path.
            w.set_backpressure_boundary(WRITE_BATCH);
            loop {
                let cmd = tokio::select! {
                    _ = closed_w.cancelled() => return,
                    c = rx.recv() => match c { Some(c) => c, None => return },
                };
                if w.feed(cmd).await.is_err() {
                    break;
                }
                // Several calls waiting means more requests are likely on their way: give
                // them a scheduler turn to join this write.
                if lock(&pending_w).len() > 1 {
                    tokio::task::yield_now().await;
                }
                while let Ok(cmd) = rx.try_recv() {
                    if w.feed(cmd).await.is_err() {
                        break;
                    }
                }
                if w.flush().await.is_err() {
                    break;
                }
            }
            closed_w.cancel();
        });
        let peer = addr.to_string();
        tokio::spawn(async move {
            let mut r = FramedRead::with_capacity(rd, FrameCodec::default(), READ_BUFFER);
            loop {
                let next = tokio::select! {
                    _ = closed.cancelled() => break,
                    n = r.next() => n,
                };
                match next {
                    Some(Ok(cmd)) if cmd.is_response() => {
                        let waiter = lock(&pending).remove(&cmd.opaque);
                        if let Some(w) = waiter {
                            let _ = w.send(cmd);
                        }
                    }
                    Some(Ok(_)) => {} // server pushes (e.g. consumer ids changed) are not needed here
                    Some(Err(e)) => {
                        tracing::warn!(peer = %peer, error = %e, "client connection failed");
                        break;
                    }
                    None => break,
                }
            }
            closed.cancel();
            lock(&pending).clear();
        });
        Ok(conn)
    }

    /// Address this connection goes to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the connection has broken.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Sends `request` and waits up to `timeout` for its response (whatever its code).
    pub async fn call(
        &self,
        mut request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, ClientError> {
        let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
        request.opaque = opaque;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(opaque, tx);
        if self.is_closed() || self.tx.send(request).await.is_err() {
            lock(&self.pending).remove(&opaque);
            return Err(ClientError::Closed(self.addr.clone()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(ClientError::Closed(self.addr.clone())),
            Err(_) => {
                lock(&self.pending).remove(&opaque);
                Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                })
            }
        }
    }

    /// Like [`Connection::call`], but turns any non-success code into an error.
    pub async fn call_ok(
        &self,
        request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, ClientError> {
        let resp = self.call(request, timeout).await?;
        if resp.code != ResponseCode::Success.code() {
            return Err(ClientError::Response {
                addr: self.addr.clone(),
                code: resp.code,
                remark: resp.remark.unwrap_or_default(),
            });
        }
        Ok(resp)
    }

    /// Closes the connection; pending calls fail with `Closed`.
    pub fn close(&self) {
        self.closed.cancel();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a pool keeps its connection to one address.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Connection>>>>;

/// Connections shared by address, re-opened when broken.
#[derive(Default)]
pub struct ConnectionPool {
    /// One slot per address, locked while its connection is made: a peer that does not
    /// answer holds up calls to itself only.
    conns: Mutex<HashMap<String, Slot>>,
    headers: SerializeType,
}

impl ConnectionPool {
    /// A pool whose requests carry their headers in `headers` (JSON, or RocketMQ's binary form,
    /// which Java brokers also accept and which costs both ends less to read and write).
    pub fn with_headers(headers: SerializeType) -> Self {
        ConnectionPool {
            conns: Default::default(),
            headers,
        }
    }

    /// A live connection to `addr`, opening one if needed.
    pub async fn get(&self, addr: &str) -> Result<Arc<Connection>, ClientError> {
        let slot = lock(&self.conns)
            .entry(addr.to_string())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(Duration::from_secs(3), Connection::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                addr: addr.to_string(),
                timeout: Duration::from_secs(3),
            })??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Whether the pool holds an open connection to `addr` (one it made that has not closed).
    pub fn connected(&self, addr: &str) -> bool {
        let slot = lock(&self.conns).get(addr).cloned();
        slot.is_some_and(|s| {
            s.try_lock()
                .map(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
                // Being connected right now.
                .unwrap_or(true)
        })
    }

    /// Sends a request to `addr` and returns a successful response, or the error.
    pub async fn call_ok(
        &self,
        addr: &str,
        mut request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, ClientError> {
        request.serialize_type = self.headers;
        self.get(addr).await?.call_ok(request, timeout).await
    }

    /// Sends a request to `addr` and returns its response whatever the code.
    pub async fn call(
        &self,
        addr: &str,
        mut request: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, ClientError> {
        request.serialize_type = self.headers;
        self.get(addr).await?.call(request, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::command::FLAG_ONEWAY;

    /// Answers every request with its own code; a request with code 99 panics. Code 30 calls
    /// the client twice at once (codes 31 and 32) and answers with what each answer's `from`
    /// said; code 40 calls it once (41) and keeps how that call ended in [`CALL_40`].
    struct Echo;

    /// How the call made for a request with code 40 ended.
    static CALL_40: Mutex<Option<String>> = Mutex::new(None);

    impl Processor for Echo {
        async fn process(&self, request: RemotingCommand, peer: &Peer) -> Option<RemotingCommand> {
            assert_ne!(request.code, 99, "a handler bug");
            let ask = |code| RemotingCommand::request(code, crate::remoting::ExtFields::default());
            if request.code == 30 {
                let link = peer.link();
                let wait = Duration::from_secs(10);
                let (x, y) = tokio::join!(link.call(ask(31), wait), link.call(ask(32), wait));
                let got = [x, y].map(|r| match r {
                    Ok(a) => a.ext_fields.get("from").unwrap_or("?").to_string(),
                    Err(e) => e.to_string(),
                });
                return Some(
                    request
                        .response_to(ResponseCode::Success)
                        .with_ext("got", got.join(",")),
                );
            }
            if request.code == 40 {
                let ended = peer.link().call(ask(41), Duration::from_secs(60)).await;
                *lock(&CALL_40) = Some(format!("{:?}", ended.map(|r| r.code)));
                return None;
            }
            if request.code == 20 {
                // Like a long-polling pull with nothing to return.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Some(
                request
                    .response_to(ResponseCode::Success)
                    .with_ext("code", request.code)
                    .with_ext("headers", request.serialize_type.byte()),
            )
        }
    }

    async fn server() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let loops = EventLoops::start("echo-io", 2, Default::default(), &stop).unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Echo),
            1 << 20,
            stop.clone(),
            loops,
        ));
        (addr, stop)
    }

    /// A raw client connection: frames out, frames in.
    async fn client(
        addr: SocketAddr,
    ) -> (
        FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
        FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    ) {
        let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
        (
            FramedWrite::new(wr, FrameCodec::default()),
            FramedRead::new(rd, FrameCodec::default()),
        )
    }

    fn request(code: i32, opaque: i32, oneway: bool) -> RemotingCommand {
        let mut r = RemotingCommand::request(code, crate::remoting::ExtFields::default());
        r.opaque = opaque;
        if oneway {
            r.flag |= FLAG_ONEWAY;
        }
        r
    }

    async fn next_frame(
        r: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
    ) -> RemotingCommand {
        tokio::time::timeout(Duration::from_secs(10), r.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection is open")
            .expect("a good frame")
    }

    #[tokio::test]
    async fn calls_to_a_client_get_its_answers_in_any_order_and_fail_when_it_goes() {
        let (addr, stop) = server().await;
        let (mut w, mut r) = client(addr).await;
        w.send(request(30, 7, false)).await.unwrap();
        let a = next_frame(&mut r).await;
        let b = next_frame(&mut r).await;
        assert!(!a.is_response() && !a.is_oneway() && !b.is_response());
        assert_ne!(a.opaque, b.opaque);
        assert!(a.opaque != 0 && b.opaque != 0, "0 is the pushes' opaque");
        // An answer nobody waits for is dropped; the two answers come in reverse order.
        let mut stray = a
            .response_to(ResponseCode::Success)
            .with_ext("from", "stray");
        stray.opaque = a.opaque.wrapping_add(b.opaque).wrapping_add(1000);
        w.feed(stray).await.unwrap();
        for call in [&b, &a] {
            let answer = call
                .response_to(ResponseCode::Success)
                .with_ext("from", call.code);
            w.feed(answer).await.unwrap();
        }
        w.flush().await.unwrap();
        let answer = next_frame(&mut r).await;
        assert_eq!(answer.opaque, 7);
        let mut got: Vec<&str> = answer.ext_fields.get("got").unwrap().split(',').collect();
        got.sort_unstable();
        assert_eq!(got, ["31", "32"]);

        // A call waiting when the client goes away ends at once, not at its 60 s timeout.
        w.send(request(40, 8, false)).await.unwrap();
        let call = next_frame(&mut r).await;
        assert_eq!(call.code, 41);
        drop((w, r));
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(e) = lock(&CALL_40).take() {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the call ended with its connection");
        assert!(ended.contains("Closed"), "{ended}");
        stop.cancel();
    }

    #[tokio::test]
    async fn oneway_floods_panics_and_half_closes_still_get_answers() {
        let (addr, stop) = server().await;
        let (mut w, mut r) = client(addr).await;
        // Far more oneway requests than the frames read between two writes, a request whose
        // handler panics, then a normal request, then the client stops sending.
        for i in 0..(4 * READS_PER_WRITE as i32) {
            w.feed(request(10, i, true)).await.unwrap();
        }
        w.feed(request(99, 1_000, false)).await.unwrap();
        w.feed(request(11, 1_001, false)).await.unwrap();
        w.flush().await.unwrap();
        w.get_mut().shutdown().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), r.next())
            .await
            .expect("the request after the oneway flood was never answered")
            .unwrap()
            .unwrap();
        assert_eq!(answer.opaque, 1_001, "only the healthy request is answered");
        assert_eq!(answer.ext_fields.get("code"), Some("11"));
        // Then the server closes its side: nothing else was pending.
        let end = tokio::time::timeout(Duration::from_secs(10), r.next()).await;
        assert!(matches!(end, Ok(None)), "{end:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_pool_sends_the_header_encoding_it_was_made_with() {
        let (addr, stop) = server().await;
        for ser in [SerializeType::Json, SerializeType::RocketMq] {
            let pool = ConnectionPool::with_headers(ser);
            let answer = pool
                .call(
                    &addr.to_string(),
                    request(11, 0, false),
                    Duration::from_secs(5),
                )
                .await
                .unwrap();
            let byte = ser.byte().to_string();
            assert_eq!(answer.ext_fields.get("headers"), Some(byte.as_str()));
            assert_eq!(answer.serialize_type, ser, "answers come back the same way");
            assert_eq!(answer.ext_fields.get("code"), Some("11"));
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn requests_behind_many_waiting_pulls_are_answered() {
        let (addr, stop) = server().await;
        let (mut w, mut r) = client(addr).await;
        for i in 0..(2 * READS_PER_WRITE as i32) {
            w.feed(request(20, i, false)).await.unwrap();
        }
        w.feed(request(11, 5_000, false)).await.unwrap();
        w.flush().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), r.next())
            .await
            .expect("a request queued behind waiting pulls was not answered")
            .unwrap()
            .unwrap();
        assert_eq!(answer.opaque, 5_000);
        stop.cancel();
    }
}
