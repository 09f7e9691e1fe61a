//! QUIC on one core: a `quinn_proto::Endpoint` and its connections, driven by one task of the
//! core's executor over the core's `R::UdpSocket`.
//!
//! quinn-proto is the protocol (packets, crypto, streams, recovery, congestion control) and
//! does no I/O; this module is the I/O and the hand-offs. One driver task per core receives
//! datagrams (`recvmmsg` with GRO through quinn-udp), feeds them to the endpoint and to their
//! connections, wakes the tasks whose streams became readable or writable, and sends what the
//! connections have to send (`sendmsg` with GSO), for every connection of the core in one pass.
//! Request tasks read and write their streams directly in the connection's state (a `RefCell`
//! on this thread) and mark the connection for the driver's next pass: there is no task per
//! connection, no channel between the endpoint and its connections, no lock, and the
//! transmissions of everything the tasks wrote in one executor round leave together.
//!
//! The handles ([`Conn`], [`RecvStream`], [`SendStream`], [`Incoming`]) are `!Send`: they hold
//! the core's `Rc`. What `h3` needs of them is in [`crate::h3_quic`].
//!
//! The socket also does the forwarding half of connection steering (`crate::steer`): a
//! received datagram whose connection ID names another core is handed to that core before this
//! core's endpoint sees it, and datagrams handed here by other cores are taken in first.
//!
//! Owns: the core's QUIC state and its socket. Must not touch: HTTP/3 (the `h3` crate, in
//! `front`), anything of another core except its forwarding inbox.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use corepin_core::runtime::UdpSocket as _;
use corepin_core::worker::CoreCounters;
use corepin_core::{Runtime, Sharded};
use quinn_proto as proto;
use quinn_proto::{ConnectionError, ConnectionHandle, ConnectionStats, DatagramEvent, Dir, StreamEvent, StreamId};
use quinn_udp::{RecvMeta, UdpSocketState};

use crate::metrics::H3Metrics;
use crate::steer;

type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Datagrams one connection may send per pass of the driver before the others get their turn
/// (quinn's connection driver uses the same bound).
const MAX_TRANSMIT_DATAGRAMS: usize = 20;
/// Datagrams per GSO send (quinn's bound: more buys little and delays the other connections).
const MAX_TRANSMIT_SEGMENTS: usize = 10;
/// Receive batches per pass of the driver before it lets the core's other tasks run.
const MAX_RECV_BATCHES: usize = 4;
/// Stateless answers waiting for a full socket, at most.
const MAX_RESPONSES: usize = 256;
/// Bytes per entry of a receive batch: the largest UDP payload, and the largest GRO batch the
/// kernel builds (its length must fit the 16-bit IP and UDP length fields).
const RECV_ENTRY: usize = 64 * 1024;

/// The core's QUIC state: shared by the driver and every handle, on this thread only.
pub(crate) struct Quic {
    state: RefCell<State>,
}

struct State {
    endpoint: proto::Endpoint,
    /// Connections by slot; a slot outlives the endpoint's handle until no handle of ours is left.
    conns: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// The endpoint's connection handle → our slot.
    by_handle: Vec<Option<usize>>,
    /// Slots with work for the driver's next pass (each at most once: `Slot::dirty`).
    dirty: Vec<usize>,
    /// Connection attempts not yet accepted, refused or retried by the server.
    incoming: VecDeque<proto::Incoming>,
    accept_waker: Option<Waker>,
    driver: Option<Waker>,
    /// The driver is mid-pass: it looks for new work when the pass ends, so nothing needs to
    /// wake it meanwhile.
    driver_running: bool,
    /// Stateless answers (version negotiation, refusals, Retries, resets): at most
    /// `MAX_RESPONSES` wait for the socket; more are dropped, as quinn drops one the socket
    /// refuses (the client sends again).
    responses: VecDeque<Owned>,
    /// A connection's datagram the socket refused (its buffer was full): sent first.
    blocked: Option<Owned>,
    /// Connection deadlines, earliest first; an entry is current only while it equals the
    /// connection's `deadline` (stale ones are skipped when they come up).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// No more connections are accepted; `accept` answers `None`.
    closed: bool,
    /// The driver ends once every connection has drained.
    stop: bool,
    /// Connections the endpoint still has (open, closing or draining).
    live: usize,
}

struct Slot {
    conn: proto::Connection,
    /// The endpoint's handle, `None` once the connection drained and the endpoint let it go.
    handle: Option<ConnectionHandle>,
    /// Handles of ours ([`Conn`] and every stream) that point here.
    refs: usize,
    dirty: bool,
    deadline: Option<Instant>,
    /// Why the connection ended (also `LocallyClosed` after [`Conn::close`]).
    error: Option<ConnectionError>,
    connected: bool,
    readers: FastMap<StreamId, Waker>,
    writers: FastMap<StreamId, Waker>,
    accept: [Option<Waker>; 2],
    open: [Vec<Waker>; 2],
    /// Tasks waiting for the handshake's end or the connection's.
    watchers: Vec<Waker>,
}

/// A datagram (or a GSO batch) waiting for the socket to take it: where it goes, and its bytes.
struct Owned {
    t: proto::Transmit,
    data: Vec<u8>,
}

impl Slot {
    fn wake_all(&mut self) {
        self.readers.drain().for_each(|(_, w)| w.wake());
        self.writers.drain().for_each(|(_, w)| w.wake());
        self.accept.iter_mut().filter_map(Option::take).for_each(Waker::wake);
        self.open.iter_mut().flat_map(std::mem::take).for_each(Waker::wake);
        self.watchers.drain(..).for_each(Waker::wake);
    }
}

fn store_waker(w: &mut Option<Waker>, cx: &Context<'_>) {
    match w {
        Some(old) if old.will_wake(cx.waker()) => {}
        _ => *w = Some(cx.waker().clone()),
    }
}

fn store_stream_waker(map: &mut FastMap<StreamId, Waker>, id: StreamId, cx: &Context<'_>) {
    match map.get_mut(&id) {
        Some(w) => w.clone_from(cx.waker()),
        None => {
            map.insert(id, cx.waker().clone());
        }
    }
}

fn register(list: &mut Vec<Waker>, cx: &Context<'_>) {
    if !list.iter().any(|w| w.will_wake(cx.waker())) {
        list.push(cx.waker().clone());
    }
}

impl State {
    fn slot(&mut self, id: usize) -> &mut Slot {
        // A handle keeps its slot (`refs`), so it exists while any handle does.
        self.conns[id].as_mut().expect("a connection slot outlives its handles")
    }

    /// Marks a connection for the driver's next pass and wakes the driver.
    fn touch(&mut self, id: usize) {
        self.mark(id);
        self.wake_driver();
    }

    fn wake_driver(&mut self) {
        if !self.driver_running {
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
    }

    fn insert(&mut self, handle: ConnectionHandle, conn: proto::Connection) -> usize {
        let slot = Slot {
            conn,
            handle: Some(handle),
            refs: 1,
            dirty: false,
            deadline: None,
            error: None,
            connected: false,
            readers: FastMap::default(),
            writers: FastMap::default(),
            accept: [None, None],
            open: [Vec::new(), Vec::new()],
            watchers: Vec::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.conns[id] = Some(slot);
                id
            }
            None => {
                self.conns.push(Some(slot));
                self.conns.len() - 1
            }
        };
        if self.by_handle.len() <= handle.0 {
            self.by_handle.resize(handle.0 + 1, None);
        }
        self.by_handle[handle.0] = Some(id);
        self.live += 1;
        id
    }

    /// One handle fewer; the last one closes a connection still open (as quinn does) and
    /// frees the slot of one that has drained.
    fn release(&mut self, id: usize) {
        let slot = self.slot(id);
        slot.refs -= 1;
        if slot.refs > 0 {
            return;
        }
        if slot.handle.is_none() {
            self.conns[id] = None;
            self.free.push(id);
            return;
        }
        if slot.error.is_none() {
            slot.conn.close(Instant::now(), proto::VarInt::from_u32(0), Bytes::new());
            slot.error = Some(ConnectionError::LocallyClosed);
        }
        self.touch(id);
    }

    /// The work of one connection in a pass: its endpoint events, its application's events
    /// (waking the tasks they concern), what it has to send, its next deadline. `false` when
    /// the socket's buffer filled up.
    fn service<S: Sender>(&mut self, id: usize, now: Instant, sender: &mut S, buf: &mut Vec<u8>) -> bool {
        let gso = sender.max_segments().clamp(1, MAX_TRANSMIT_SEGMENTS);
        let Some(slot) = self.conns[id].as_mut() else { return true };
        slot.dirty = false;
        if !self.events_of(id) {
            return true;
        }
        let mut sent = 0;
        let mut blocked = false;
        loop {
            if sent >= MAX_TRANSMIT_DATAGRAMS {
                // Fair to the others: the rest goes in the next pass.
                self.mark(id);
                break;
            }
            let slot = self.slot(id);
            buf.clear();
            let Some(t) = slot.conn.poll_transmit(now, gso, buf) else { break };
            sent += t.segment_size.map_or(1, |s| t.size.div_ceil(s));
            if !sender.send(&t, &buf[..t.size]) {
                // The socket's buffer is full: keep the datagram, and the connection's turn.
                self.blocked = Some(owned(t, buf));
                self.mark(id);
                blocked = true;
                break;
            }
        }
        if self.events_of(id) {
            let slot = self.slot(id);
            let deadline = slot.conn.poll_timeout();
            if deadline != slot.deadline {
                slot.deadline = deadline;
                if let Some(d) = deadline {
                    self.timers.push(Reverse((d, id)));
                }
            }
        }
        !blocked
    }

    /// Marks a connection for the driver's next pass.
    fn mark(&mut self, id: usize) {
        let slot = self.slot(id);
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Hands a connection's events to the endpoint and to the tasks they concern; when the
    /// connection has drained, lets it go (the endpoint already has, on its `Drained` event).
    /// `false` when the connection is gone from the endpoint.
    fn events_of(&mut self, id: usize) -> bool {
        let Some(slot) = self.conns[id].as_mut() else { return false };
        let Some(handle) = slot.handle else { return false };
        while let Some(ev) = slot.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(handle, ev) {
                slot.conn.handle_event(back);
            }
        }
        app_events(slot);
        if !slot.conn.is_drained() {
            return true;
        }
        // The endpoint may hand the same handle to a new connection from now on.
        if self.by_handle.get(handle.0).copied().flatten() == Some(id) {
            self.by_handle[handle.0] = None;
        }
        slot.handle = None;
        slot.deadline = None;
        if slot.error.is_none() {
            slot.error = Some(ConnectionError::LocallyClosed);
        }
        slot.wake_all();
        self.live -= 1;
        if slot.refs == 0 {
            self.conns[id] = None;
            self.free.push(id);
        }
        false
    }

    /// Runs the timers that are due.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.conns[id].as_mut() else { continue };
            if slot.deadline != Some(at) {
                continue; // stale: the connection's deadline moved since
            }
            slot.deadline = None;
            slot.conn.handle_timeout(now);
            self.mark(id);
        }
        // Stale entries pile up (a connection's deadline moves on most packets): rebuild from
        // the connections' deadlines when they outnumber the live ones by far.
        if self.timers.len() > 64 + 8 * self.live {
            let current = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(id, s)| Some(Reverse((s.as_ref()?.deadline?, id))))
                .collect();
            self.timers = current;
        }
    }

    /// A received datagram, to the endpoint and to its connection.
    fn handle_datagram(&mut self, now: Instant, meta: &RecvMeta, data: BytesMut, buf: &mut Vec<u8>) {
        buf.clear();
        let ecn = meta.ecn.map(proto_ecn);
        match self.endpoint.handle(now, meta.addr, meta.dst_ip, ecn, data, buf) {
            // Only while the endpoint has a server configuration (`refuse_new` removes it).
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.incoming.push_back(incoming);
                if let Some(w) = self.accept_waker.take() {
                    w.wake();
                }
            }
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                let Some(id) = self.by_handle.get(handle.0).copied().flatten() else { return };
                self.slot(id).conn.handle_event(event);
                self.mark(id);
            }
            Some(DatagramEvent::Response(t)) => self.respond(t, buf),
            None => {}
        }
    }

    /// Hands the dirty connections' events to the endpoint and to the tasks (no sending).
    fn events(&mut self) {
        for i in 0..self.dirty.len() {
            self.events_of(self.dirty[i]);
        }
    }

    /// Queues a stateless answer for the socket, or drops it when too many wait already.
    fn respond(&mut self, t: proto::Transmit, buf: &[u8]) {
        if self.responses.len() < MAX_RESPONSES {
            self.responses.push_back(owned(t, buf));
        }
        self.wake_driver();
    }

    /// The socket failed: every connection of the core ends with it.
    fn fail(&mut self, e: &io::Error) {
        self.closed = true;
        self.stop = true;
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        let reason = ConnectionError::TransportError(proto::TransportError {
            code: proto::TransportErrorCode::INTERNAL_ERROR,
            frame: None,
            reason: format!("the core's UDP socket failed: {e}"),
        });
        for slot in self.conns.iter_mut().flatten() {
            if slot.error.is_none() {
                slot.error = Some(reason.clone());
            }
            slot.wake_all();
        }
        self.live = 0;
    }

    /// Earliest deadline of any connection.
    fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }
}

fn owned(t: proto::Transmit, buf: &[u8]) -> Owned {
    Owned { data: buf[..t.size].to_vec(), t }
}

fn app_events(slot: &mut Slot) {
    while let Some(ev) = slot.conn.poll() {
        match ev {
            proto::Event::HandshakeDataReady => {}
            proto::Event::Connected => {
                slot.connected = true;
                slot.watchers.drain(..).for_each(Waker::wake);
            }
            proto::Event::ConnectionLost { reason } => {
                if slot.error.is_none() {
                    slot.error = Some(reason);
                }
                slot.wake_all();
            }
            proto::Event::Stream(StreamEvent::Opened { dir }) => {
                if let Some(w) = slot.accept[dir as usize].take() {
                    w.wake();
                }
            }
            proto::Event::Stream(StreamEvent::Readable { id }) => {
                if let Some(w) = slot.readers.remove(&id) {
                    w.wake();
                }
            }
            proto::Event::Stream(StreamEvent::Writable { id } | StreamEvent::Stopped { id, .. }) => {
                if let Some(w) = slot.writers.remove(&id) {
                    w.wake();
                }
            }
            proto::Event::Stream(StreamEvent::Available { dir }) => {
                std::mem::take(&mut slot.open[dir as usize]).into_iter().for_each(Waker::wake);
            }
            proto::Event::Stream(StreamEvent::Finished { .. })
            | proto::Event::DatagramReceived
            | proto::Event::DatagramsUnblocked => {}
        }
    }
}

/// An application error code as QUIC carries it (codes beyond 2^62 become the largest).
fn varint(code: u64) -> proto::VarInt {
    proto::VarInt::from_u64(code).unwrap_or(proto::VarInt::MAX)
}

fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> proto::EcnCodepoint {
    match ecn {
        quinn_udp::EcnCodepoint::Ect0 => proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => proto::EcnCodepoint::Ce,
    }
}

fn udp_ecn(ecn: proto::EcnCodepoint) -> quinn_udp::EcnCodepoint {
    match ecn {
        proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
        proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
        proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
    }
}

/// Where the driver's datagrams go: `false` when the socket's buffer is full.
trait Sender {
    fn send(&mut self, t: &proto::Transmit, data: &[u8]) -> bool;
    /// Datagrams one GSO send may carry now (quinn-udp lowers it if the kernel refuses GSO).
    fn max_segments(&self) -> usize;
}

// ---- the endpoint ----------------------------------------------------------------------

/// One core's QUIC endpoint: what the accept loop and the drain use.
pub(crate) struct Endpoint {
    quic: Rc<Quic>,
}

impl Endpoint {
    /// The endpoint over `socket`, and the driver that must run on this core's executor for
    /// anything to happen.
    pub(crate) fn new<R: Runtime>(
        config: proto::EndpointConfig,
        server: Arc<proto::ServerConfig>,
        socket: CoreSocket<R>,
    ) -> (Self, Driver<R>) {
        let allow_mtud = !socket.state.may_fragment();
        let endpoint = proto::Endpoint::new(Arc::new(config), Some(server), allow_mtud, None);
        let state = State {
            endpoint,
            conns: Vec::new(),
            free: Vec::new(),
            by_handle: Vec::new(),
            dirty: Vec::new(),
            incoming: VecDeque::new(),
            accept_waker: None,
            driver: None,
            driver_running: false,
            responses: VecDeque::new(),
            blocked: None,
            timers: BinaryHeap::new(),
            closed: false,
            stop: false,
            live: 0,
        };
        let quic = Rc::new(Quic { state: RefCell::new(state) });
        let driver = Driver::new(Rc::clone(&quic), socket);
        (Self { quic }, driver)
    }

    /// The next connection attempt; `None` once the endpoint is closed.
    pub(crate) async fn accept(&self) -> Option<Incoming> {
        std::future::poll_fn(|cx| {
            let mut st = self.quic.state.borrow_mut();
            if st.closed {
                return Poll::Ready(None);
            }
            match st.incoming.pop_front() {
                Some(i) => Poll::Ready(Some(Incoming { quic: Rc::clone(&self.quic), inner: Some(i) })),
                None => {
                    store_waker(&mut st.accept_waker, cx);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Takes no new connections: attempts are refused from now on.
    pub(crate) fn refuse_new(&self) {
        let mut st = self.quic.state.borrow_mut();
        st.endpoint.set_server_config(None);
        st.closed = true;
        let mut buf = Vec::new();
        for i in std::mem::take(&mut st.incoming) {
            buf.clear();
            let t = st.endpoint.refuse(i, &mut buf);
            st.respond(t, &buf);
        }
        if let Some(w) = st.accept_waker.take() {
            w.wake();
        }
        st.wake_driver();
    }

    /// Closes every connection with `code` and `reason`; the driver ends once they drained.
    pub(crate) fn close(&self, code: u64, reason: &[u8]) {
        self.refuse_new();
        let mut st = self.quic.state.borrow_mut();
        let now = Instant::now();
        let reason = Bytes::copy_from_slice(reason);
        for id in 0..st.conns.len() {
            let Some(slot) = st.conns[id].as_mut() else { continue };
            if slot.handle.is_none() {
                continue;
            }
            slot.conn.close(now, varint(code), reason.clone());
            if slot.error.is_none() {
                slot.error = Some(ConnectionError::LocallyClosed);
            }
            slot.wake_all();
            st.touch(id);
        }
        st.stop = true;
        st.wake_driver();
    }

    /// Connections the endpoint still has (open, closing or draining).
    pub(crate) fn open_connections(&self) -> usize {
        self.quic.state.borrow().live
    }
}

/// A connection attempt the server has not decided on yet. Dropped undecided, it is ignored
/// (no answer is sent).
pub(crate) struct Incoming {
    quic: Rc<Quic>,
    inner: Option<proto::Incoming>,
}

impl Incoming {
    fn get(&self) -> &proto::Incoming {
        self.inner.as_ref().expect("an Incoming is decided once")
    }

    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.get().remote_address()
    }

    pub(crate) fn remote_address_validated(&self) -> bool {
        self.get().remote_address_validated()
    }

    pub(crate) fn may_retry(&self) -> bool {
        self.get().may_retry()
    }

    /// Answers with CONNECTION_REFUSED.
    pub(crate) fn refuse(mut self) {
        let i = self.inner.take().expect("an Incoming is decided once");
        let mut st = self.quic.state.borrow_mut();
        let mut buf = Vec::new();
        let t = st.endpoint.refuse(i, &mut buf);
        st.respond(t, &buf);
    }

    /// Answers with a Retry carrying an address-validation token.
    pub(crate) fn retry(mut self) -> Result<(), RetryRefused> {
        let i = self.inner.take().expect("an Incoming is decided once");
        let mut st = self.quic.state.borrow_mut();
        let mut buf = Vec::new();
        match st.endpoint.retry(i, &mut buf) {
            Ok(t) => {
                st.respond(t, &buf);
                Ok(())
            }
            Err(e) => {
                // The attempt goes unanswered.
                st.endpoint.ignore(e.into_incoming());
                Err(RetryRefused)
            }
        }
    }

    /// Accepts the attempt: the handshake goes on in the driver. After the endpoint stopped
    /// taking connections (a drain), the attempt is refused instead.
    pub(crate) fn accept(mut self) -> Result<Conn, ConnectionError> {
        let i = self.inner.take().expect("an Incoming is decided once");
        let mut st = self.quic.state.borrow_mut();
        let mut buf = Vec::new();
        if st.closed {
            let t = st.endpoint.refuse(i, &mut buf);
            st.respond(t, &buf);
            return Err(ConnectionError::LocallyClosed);
        }
        match st.endpoint.accept(i, Instant::now(), &mut buf, None) {
            Ok((handle, conn)) => {
                let id = st.insert(handle, conn);
                st.touch(id);
                drop(st);
                Ok(Conn { quic: Rc::clone(&self.quic), id })
            }
            Err(e) => {
                if let Some(t) = e.response {
                    st.respond(t, &buf);
                }
                Err(e.cause)
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(i) = self.inner.take() {
            // Nothing holds the state borrowed while a task drops a handle.
            self.quic.state.borrow_mut().endpoint.ignore(i);
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Attempts never decided are let go of properly (quinn-proto warns otherwise).
        for i in std::mem::take(&mut self.incoming) {
            self.endpoint.ignore(i);
        }
    }
}

/// A Retry was asked for an attempt that already carried a Retry token (quinn-proto allows
/// one per attempt); the attempt is dropped unanswered.
#[derive(Debug, thiserror::Error)]
#[error("this attempt already answered a Retry; it is dropped")]
pub(crate) struct RetryRefused;

// ---- connections -----------------------------------------------------------------------

/// A handle to one connection of the core. The last handle dropped (this and every stream's)
/// closes the connection if it is still open.
pub(crate) struct Conn {
    quic: Rc<Quic>,
    id: usize,
}

impl Clone for Conn {
    fn clone(&self) -> Self {
        self.quic.state.borrow_mut().slot(self.id).refs += 1;
        Self { quic: Rc::clone(&self.quic), id: self.id }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.quic.state.borrow_mut().release(self.id);
    }
}

impl Conn {
    fn with<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> T {
        f(self.quic.state.borrow_mut().slot(self.id))
    }

    /// Runs `f` on the connection and marks it for the driver's next pass.
    fn touching<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut st = self.quic.state.borrow_mut();
        let out = f(st.slot(self.id));
        st.touch(self.id);
        out
    }

    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.with(|s| s.conn.remote_address())
    }

    pub(crate) fn stats(&self) -> ConnectionStats {
        self.with(|s| s.conn.stats())
    }

    /// Why the connection ended, once it has.
    pub(crate) fn close_reason(&self) -> Option<ConnectionError> {
        self.with(|s| s.error.clone())
    }

    /// Whether the handshake is complete.
    pub(crate) fn is_connected(&self) -> bool {
        self.with(|s| s.connected)
    }

    /// Closes the connection with an application error code.
    pub(crate) fn close(&self, code: u64, reason: &[u8]) {
        self.touching(|s| {
            if s.error.is_none() && s.handle.is_some() {
                s.conn.close(Instant::now(), varint(code), Bytes::copy_from_slice(reason));
                s.error = Some(ConnectionError::LocallyClosed);
                s.wake_all();
            }
        })
    }

    /// Resolves when the handshake completes (`Ok`) or the connection ends first (`Err`).
    pub(crate) async fn handshake(&self) -> Result<(), ConnectionError> {
        std::future::poll_fn(|cx| {
            self.with(|s| {
                if s.connected {
                    Poll::Ready(Ok(()))
                } else if let Some(e) = &s.error {
                    Poll::Ready(Err(e.clone()))
                } else {
                    register(&mut s.watchers, cx);
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// Resolves when the connection has ended, with why.
    pub(crate) async fn closed(&self) -> ConnectionError {
        std::future::poll_fn(|cx| {
            self.with(|s| match &s.error {
                Some(e) => Poll::Ready(e.clone()),
                None => {
                    register(&mut s.watchers, cx);
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// A stream the peer opened in direction `dir`.
    pub(crate) fn poll_accept(&self, cx: &mut Context<'_>, dir: Dir) -> Poll<Result<StreamId, ConnectionError>> {
        let mut st = self.quic.state.borrow_mut();
        let s = st.slot(self.id);
        if let Some(id) = s.conn.streams().accept(dir) {
            // Taking a stream may raise the peer's stream limit: a MAX_STREAMS to send.
            st.touch(self.id);
            return Poll::Ready(Ok(id));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        store_waker(&mut s.accept[dir as usize], cx);
        Poll::Pending
    }

    /// A new stream of ours in direction `dir`.
    pub(crate) fn poll_open(&self, cx: &mut Context<'_>, dir: Dir) -> Poll<Result<StreamId, ConnectionError>> {
        let mut st = self.quic.state.borrow_mut();
        let s = st.slot(self.id);
        if let Some(e) = &s.error {
            return Poll::Ready(Err(e.clone()));
        }
        if let Some(id) = s.conn.streams().open(dir) {
            st.touch(self.id);
            return Poll::Ready(Ok(id));
        }
        register(&mut s.open[dir as usize], cx);
        Poll::Pending
    }

    pub(crate) fn recv_stream(&self, id: StreamId) -> RecvStream {
        RecvStream { conn: self.clone(), id, all_read: false }
    }

    pub(crate) fn send_stream(&self, id: StreamId) -> SendStream {
        SendStream { conn: self.clone(), id, done: false }
    }
}

/// Why a read ended other than with data.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer reset the stream with this code.
    Reset(u64),
    /// The connection ended.
    Connection(ConnectionError),
    /// The stream is not open for reading (already stopped or finished).
    Closed,
}

/// Why a write failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The peer asked us to stop, with this code.
    Stopped(u64),
    /// The connection ended.
    Connection(ConnectionError),
    /// The stream is already finished or reset.
    Closed,
}

/// The receiving half of a stream.
pub(crate) struct RecvStream {
    conn: Conn,
    id: StreamId,
    all_read: bool,
}

impl RecvStream {
    pub(crate) fn id(&self) -> StreamId {
        self.id
    }

    /// The next chunk of the stream, `None` at its end.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ReadError>> {
        let mut st = self.conn.quic.state.borrow_mut();
        let s = st.slot(self.conn.id);
        let mut stream = s.conn.recv_stream(self.id);
        let mut chunks = match stream.read(true) {
            Ok(c) => c,
            Err(_) => {
                self.all_read = true;
                return Poll::Ready(Err(ReadError::Closed));
            }
        };
        let got = chunks.next(usize::MAX);
        let transmit = chunks.finalize().should_transmit();
        let out = match got {
            Ok(Some(chunk)) => Poll::Ready(Ok(Some(chunk.bytes))),
            Ok(None) => {
                self.all_read = true;
                Poll::Ready(Ok(None))
            }
            Err(proto::ReadError::Reset(code)) => {
                self.all_read = true;
                Poll::Ready(Err(ReadError::Reset(code.into_inner())))
            }
            Err(proto::ReadError::Blocked) => match &s.error {
                Some(e) => Poll::Ready(Err(ReadError::Connection(e.clone()))),
                None => {
                    store_stream_waker(&mut s.readers, self.id, cx);
                    Poll::Pending
                }
            },
        };
        if transmit {
            st.touch(self.conn.id);
        }
        out
    }

    /// Asks the peer to stop sending, with `code`.
    pub(crate) fn stop(&mut self, code: u64) {
        let code = varint(code);
        let id = self.id;
        self.all_read = true;
        self.conn.touching(|s| {
            let _ = s.conn.recv_stream(id).stop(code);
        });
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let (id, all_read) = (self.id, self.all_read);
        let mut st = self.conn.quic.state.borrow_mut();
        let s = st.slot(self.conn.id);
        s.readers.remove(&id);
        // Unread data: tell the peer to stop (code 0, as quinn does).
        if !all_read && s.error.is_none() && s.conn.recv_stream(id).stop(proto::VarInt::from_u32(0)).is_ok() {
            st.touch(self.conn.id);
        }
    }
}

/// The sending half of a stream.
pub(crate) struct SendStream {
    conn: Conn,
    id: StreamId,
    /// Finished or reset by us.
    done: bool,
}

impl SendStream {
    pub(crate) fn id(&self) -> StreamId {
        self.id
    }

    /// Writes as much of `data` as flow and congestion control take now; Pending (the task is
    /// woken when more is taken) when they take nothing.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<Result<usize, WriteError>> {
        let mut st = self.conn.quic.state.borrow_mut();
        let s = st.slot(self.conn.id);
        if let Some(e) = &s.error {
            return Poll::Ready(Err(WriteError::Connection(e.clone())));
        }
        match s.conn.send_stream(self.id).write(data) {
            Ok(n) => {
                st.touch(self.conn.id);
                Poll::Ready(Ok(n))
            }
            Err(proto::WriteError::Blocked) => {
                store_stream_waker(&mut s.writers, self.id, cx);
                Poll::Pending
            }
            Err(proto::WriteError::Stopped(code)) => Poll::Ready(Err(WriteError::Stopped(code.into_inner()))),
            Err(proto::WriteError::ClosedStream) => Poll::Ready(Err(WriteError::Closed)),
        }
    }

    /// Ends the stream after what was written. A stream the peer asked to stop counts as
    /// ended here, as in quinn (it is reset with the peer's code when dropped).
    pub(crate) fn finish(&mut self) -> Result<(), WriteError> {
        let id = self.id;
        let out = self.conn.touching(|s| match s.conn.send_stream(id).finish() {
            Ok(()) => Ok(true),
            Err(proto::FinishError::Stopped(_)) => Ok(false),
            Err(proto::FinishError::ClosedStream) => Err(WriteError::Closed),
        })?;
        self.done = out;
        Ok(())
    }

    /// Abandons the stream with `code`.
    pub(crate) fn reset(&mut self, code: u64) {
        let code = varint(code);
        let id = self.id;
        self.done = true;
        self.conn.touching(|s| {
            let _ = s.conn.send_stream(id).reset(code);
        });
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let (id, done) = (self.id, self.done);
        let mut st = self.conn.quic.state.borrow_mut();
        let s = st.slot(self.conn.id);
        s.writers.remove(&id);
        if done || s.error.is_some() {
            return;
        }
        // Dropped without an end: finish it (or, stopped by the peer, reset it with the
        // peer's code), as quinn does.
        let ended = match s.conn.send_stream(id).finish() {
            Ok(()) => true,
            Err(proto::FinishError::Stopped(code)) => s.conn.send_stream(id).reset(code).is_ok(),
            Err(proto::FinishError::ClosedStream) => false,
        };
        if ended {
            st.touch(self.conn.id);
        }
    }
}

// ---- the socket and the driver ---------------------------------------------------------

/// A datagram passed from the core it reached to the core that owns its connection, with what
/// the kernel said about it (source and destination address, ECN).
struct Forwarded {
    meta: RecvMeta,
    data: Vec<u8>,
}

/// One core's queue of datagrams forwarded to it, and the driver waiting for them.
#[derive(Default)]
pub struct ForwardInbox {
    queue: RefCell<VecDeque<Forwarded>>,
    waker: RefCell<Option<Waker>>,
}

impl ForwardInbox {
    fn push(&self, datagram: Forwarded) {
        self.queue.borrow_mut().push_back(datagram);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// The forwarding of one core: which core it is, every core's inbox, the counters.
pub struct Forwarding {
    /// This core's index.
    pub core: usize,
    /// The number of cores (the modulus of the connection IDs' routing byte).
    pub cores: usize,
    /// Every core's inbox.
    pub inboxes: Sharded<ForwardInbox>,
    /// Where forwarded datagrams are counted.
    pub metrics: Arc<H3Metrics>,
}

/// [`Forwarding`] on its core, with the core's own inbox at hand.
struct LocalForwarding {
    cfg: Forwarding,
    inbox: Rc<ForwardInbox>,
}

impl LocalForwarding {
    /// Moves datagrams forwarded to this core into the receive buffers; how many.
    fn take_in(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut queue = self.inbox.queue.borrow_mut();
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(d) = queue.pop_front() else { break };
            if d.data.len() > bufs[n].len() {
                continue; // larger than any datagram the endpoint accepts: dropped
            }
            bufs[n][..d.data.len()].copy_from_slice(&d.data);
            meta[n] = RecvMeta { len: d.data.len(), stride: d.data.len(), ..d.meta };
            n += 1;
        }
        if n > 0 {
            CoreCounters::add(&self.cfg.metrics.core(self.cfg.core).forwarded_in, n as u64);
        }
        n
    }

    /// Hands every received datagram whose connection ID names another core to that core, and
    /// takes it out of what this core's endpoint will see (a GRO batch is split by segment).
    fn send_out(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        let (core, cores) = (self.cfg.core, self.cfg.cores);
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            // The common case: nothing in this batch belongs elsewhere.
            if buf[..m.len].chunks(stride).all(|seg| steer::owner(seg, cores).is_none_or(|o| o == core)) {
                continue;
            }
            let mut kept = 0;
            let mut at = 0;
            while at < m.len {
                let end = (at + stride).min(m.len);
                match steer::owner(&buf[at..end], cores) {
                    Some(owner) if owner != core => {
                        let d = Forwarded { meta: *m, data: buf[at..end].to_vec() };
                        let sent = self.cfg.inboxes.post_on(owner, move |inbox| inbox.push(d)).is_ok();
                        if sent {
                            CoreCounters::add(&self.cfg.metrics.core(core).forwarded_out, 1);
                        }
                    }
                    _ => {
                        buf.copy_within(at..end, kept);
                        kept += end - at;
                    }
                }
                at = end;
            }
            m.len = kept;
        }
    }

    fn has_pending(&self) -> bool {
        !self.inbox.queue.borrow().is_empty()
    }

    fn park(&self, waker: &Waker) {
        let mut slot = self.inbox.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

/// The core's UDP socket: the engine's `R::UdpSocket` for readiness, quinn-udp's
/// `UdpSocketState` for the syscalls on its descriptor (`sendmsg` with GSO, `recvmmsg` with GRO,
/// ECN, the destination address).
pub struct CoreSocket<R: Runtime> {
    socket: Rc<R::UdpSocket>,
    state: UdpSocketState,
    /// The descriptor, owned by `socket`, which lives as long as this value.
    fd: RawFd,
    forward: Option<LocalForwarding>,
}

impl<R: Runtime> CoreSocket<R> {
    /// Adopts a bound socket into this core's engine. quinn-udp sets the socket options it
    /// needs (ECN and destination-address reporting, GRO, don't-fragment) and probes GSO.
    pub fn adopt(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let socket = R::UdpSocket::from_std(socket)?;
        let fd = socket.as_raw_fd();
        Ok(Self { socket: Rc::new(socket), state, fd, forward: None })
    }

    /// Forwards datagrams of other cores' connections to them, and receives theirs. Called on
    /// the socket's own worker.
    pub fn with_forwarding(mut self, cfg: Forwarding) -> io::Result<Self> {
        let inbox =
            cfg.inboxes.local().ok_or_else(|| io::Error::other("forwarding is set up on a corepin worker thread"))?;
        self.forward = Some(LocalForwarding { cfg, inbox });
        Ok(self)
    }

    fn borrowed(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` belongs to the engine socket held by `self.socket`, which is dropped only
        // with `self`, so the descriptor is open for the lifetime of this borrow.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// The engine's wait for the socket to become readable or writable, as a future the driver
/// keeps across passes.
fn readiness<R: Runtime>(socket: &Rc<R::UdpSocket>, dir: Direction) -> LocalFuture<io::Result<()>> {
    let socket = Rc::clone(socket);
    Box::pin(async move {
        match dir {
            Direction::Read => socket.readable().await,
            Direction::Write => socket.writable().await,
        }
    })
}

/// The socket's send side during a pass: sends until the kernel's buffer is full.
struct SocketSender<'a, R: Runtime> {
    socket: &'a CoreSocket<R>,
    full: &'a Cell<bool>,
}

impl<R: Runtime> Sender for SocketSender<'_, R> {
    fn max_segments(&self) -> usize {
        self.socket.state.max_gso_segments()
    }

    fn send(&mut self, what: &proto::Transmit, data: &[u8]) -> bool {
        if self.full.get() {
            return false;
        }
        let t = quinn_udp::Transmit {
            destination: what.destination,
            ecn: what.ecn.map(udp_ecn),
            contents: data,
            segment_size: what.segment_size,
            src_ip: what.src_ip,
        };
        loop {
            match self.socket.state.send((&self.socket.borrowed()).into(), &t) {
                Ok(()) => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.full.set(true);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Any other error concerns this datagram only (quinn-udp already logs and
                // drops the ones it knows to be transient); QUIC recovers it as a loss.
                Err(e) => {
                    tracing::debug!("sending a QUIC datagram to {} failed: {e}", what.destination);
                    return true;
                }
            }
        }
    }
}

/// The task that moves one core's datagrams: spawn it on the core's executor; it ends after
/// [`Endpoint::close`] once every connection has drained.
pub(crate) struct Driver<R: Runtime> {
    quic: Rc<Quic>,
    socket: CoreSocket<R>,
    /// `BATCH_SIZE` entries of `RECV_ENTRY` bytes, and what the kernel said of each.
    recv_buf: Box<[u8]>,
    metas: [RecvMeta; quinn_udp::BATCH_SIZE],
    send_buf: Vec<u8>,
    response_buf: Vec<u8>,
    /// The wait for readability, armed when a receive found the queue empty.
    readable: Option<LocalFuture<io::Result<()>>>,
    /// The last receive returned fewer datagrams than it had room for: the queue was empty.
    drained: bool,
    /// The wait for writability, armed when a send met a full buffer.
    writable: Option<LocalFuture<io::Result<()>>>,
    full: Cell<bool>,
    /// The engine's sleep toward `timer_at` (or an earlier deadline; re-armed when early).
    timer: Option<LocalFuture<()>>,
    timer_at: Option<Instant>,
}

impl<R: Runtime> Driver<R> {
    fn new(quic: Rc<Quic>, socket: CoreSocket<R>) -> Self {
        // Untouched pages of it are never faulted in: a batch of small datagrams uses the first
        // page or two of each entry.
        let recv_buf = vec![0u8; RECV_ENTRY * quinn_udp::BATCH_SIZE].into_boxed_slice();
        Self {
            quic,
            socket,
            recv_buf,
            metas: [RecvMeta::default(); quinn_udp::BATCH_SIZE],
            send_buf: Vec::with_capacity(64 * 1024),
            response_buf: Vec::with_capacity(1500),
            readable: None,
            drained: false,
            writable: None,
            full: Cell::new(false),
            timer: None,
            timer_at: None,
        }
    }

    /// Receives what is queued (up to a bound) and hands it to the endpoint and the
    /// connections, waking the tasks whose streams it concerns; `true` if the bound stopped it
    /// with more perhaps queued.
    fn receive(&mut self, cx: &mut Context<'_>, now: Instant) -> io::Result<bool> {
        let mut more = true;
        for _ in 0..MAX_RECV_BATCHES {
            let handed = self.socket.forward.as_ref().is_some_and(LocalForwarding::has_pending);
            if !handed && !self.socket_ready(cx)? {
                if let Some(f) = &self.socket.forward {
                    f.park(cx.waker());
                }
                more = false;
                break;
            }
            self.receive_batch(now, handed)?;
        }
        // Wake the tasks now; what the connections send goes in the next pass, after the tasks
        // have run, so their answers leave with the acknowledgements.
        self.quic.state.borrow_mut().events();
        Ok(more)
    }

    /// Whether a receive may find datagrams: no wait for readability is pending. Most passes
    /// are for the tasks' writes and end here, without a syscall.
    fn socket_ready(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        loop {
            if let Some(wait) = self.readable.as_mut() {
                return match wait.as_mut().poll(cx) {
                    Poll::Pending => Ok(false),
                    Poll::Ready(res) => {
                        self.readable = None;
                        res.map(|()| true)
                    }
                };
            }
            if !self.drained {
                return Ok(true);
            }
            // The last receive emptied the queue: wait first. Every engine's `readable` is
            // level-triggered (the contract), so this completes at once if datagrams came
            // since, and on io_uring engines its POLL_ADD goes in with the engine's next
            // submission, not in a syscall of its own.
            self.drained = false;
            self.readable = Some(readiness::<R>(&self.socket.socket, Direction::Read));
        }
    }

    /// One batch: the datagrams other cores handed here (`handed`), or one `recvmmsg`, to the
    /// endpoint and the connections.
    fn receive_batch(&mut self, now: Instant, handed: bool) -> io::Result<()> {
        const BATCH: usize = quinn_udp::BATCH_SIZE;
        let metas = &mut self.metas;
        let mut iovs: [IoSliceMut<'_>; BATCH] = {
            let mut bufs = self.recv_buf.chunks_mut(RECV_ENTRY).map(IoSliceMut::new);
            // `recv_buf` is BATCH entries long (`Driver::new`).
            std::array::from_fn(|_| bufs.next().expect("one entry per batch slot"))
        };
        let n = if handed {
            corepin_core::arrivals::note_handed();
            self.socket.forward.as_ref().map_or(0, |f| f.take_in(&mut iovs, metas))
        } else {
            match self.socket.state.recv((&self.socket.borrowed()).into(), &mut iovs, metas) {
                Ok(got) => {
                    // On Linux, `recvmmsg` stops short only when the queue is empty (one
                    // datagram per call elsewhere, where this only costs a wait).
                    self.drained = got < BATCH;
                    // Counted for the open-file cache (`corepin_core::arrivals`), after the
                    // syscall, never before.
                    corepin_core::arrivals::note();
                    if let Some(f) = &self.socket.forward {
                        f.send_out(&mut iovs, metas, got);
                    }
                    got
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = Some(readiness::<R>(&self.socket.socket, Direction::Read));
                    return Ok(());
                }
                // ECONNRESET is undefined in QUIC and may be injected: ignored, as quinn does.
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionReset) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        };
        let mut st = self.quic.state.borrow_mut();
        for (meta, buf) in metas.iter().zip(iovs.iter()).take(n) {
            let stride = meta.stride.max(1);
            let mut at = 0;
            while at < meta.len {
                let end = (at + stride).min(meta.len);
                st.handle_datagram(now, meta, BytesMut::from(&buf[at..end]), &mut self.response_buf);
                at = end;
            }
        }
        Ok(())
    }

    /// Sends the stateless answers and what the dirty connections have to send, until the
    /// socket's buffer is full (then the wait for writability is armed and registered).
    fn transmit(&mut self, cx: &mut Context<'_>, now: Instant) {
        // A few rounds at most: a socket that says it is writable and then refuses the next
        // datagram again is retried in a later pass, not in a loop here.
        for _ in 0..4 {
            if self.full.get() {
                let wait = self.writable.get_or_insert_with(|| readiness::<R>(&self.socket.socket, Direction::Write));
                match wait.as_mut().poll(cx) {
                    Poll::Pending => return,
                    Poll::Ready(_) => {
                        self.writable = None;
                        self.full.set(false);
                    }
                }
            }
            let mut sender = SocketSender { socket: &self.socket, full: &self.full };
            let mut st = self.quic.state.borrow_mut();
            if let Some(b) = st.blocked.take() {
                if !sender.send(&b.t, &b.data) {
                    st.blocked = Some(b);
                }
            }
            while !self.full.get() {
                let Some(r) = st.responses.pop_front() else { break };
                if !sender.send(&r.t, &r.data) {
                    st.responses.push_front(r);
                }
            }
            if !self.full.get() {
                let dirty = std::mem::take(&mut st.dirty);
                let mut rest = dirty.into_iter();
                for id in rest.by_ref() {
                    if !st.service(id, now, &mut sender, &mut self.send_buf) {
                        break;
                    }
                }
                // Stopped by a full buffer: the others (still marked) keep their turn for a later
                // pass.
                st.dirty.extend(rest);
            }
            if !self.full.get() {
                return;
            }
        }
        // Still refused after the rounds above: come back after the other tasks.
        cx.waker().wake_by_ref();
    }

    /// Keeps the engine's sleep armed toward the earliest deadline; `true` when it has passed.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let next = self.quic.state.borrow().next_deadline();
        let Some(at) = next else {
            self.timer = None;
            self.timer_at = None;
            return false;
        };
        // A sleep armed toward a later deadline is too late; one toward an earlier one serves
        // (it fires early and is re-armed for the rest).
        if self.timer_at.is_some_and(|armed| at < armed) {
            self.timer = None;
        }
        loop {
            if let Some(sleep) = self.timer.as_mut() {
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => return false,
                    Poll::Ready(()) => self.timer = None,
                }
            }
            let now = Instant::now();
            if now >= at {
                self.timer_at = None;
                return true;
            }
            self.timer_at = Some(at);
            self.timer = Some(Box::pin(R::sleep(at - now)));
        }
    }
}

impl<R: Runtime> Future for Driver<R> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut st = this.quic.state.borrow_mut();
            store_waker(&mut st.driver, cx);
            st.driver_running = true;
        }
        let result = this.pass(cx);
        let mut st = this.quic.state.borrow_mut();
        st.driver_running = false;
        if let Err(e) = result {
            // The socket failed: no connection of this core can go on. The accept loop and
            // every task of a connection are told (the worker reports the error it gets from
            // this task).
            st.fail(&e);
            return Poll::Ready(Err(e));
        }
        if st.stop && st.live == 0 && st.responses.is_empty() && st.blocked.is_none() {
            return Poll::Ready(Ok(()));
        }
        // Work made during the pass (or left by a bound) is done in another pass, after the
        // tasks it woke have run: their writes then leave in the same transmissions.
        if !this.full.get() && (!st.dirty.is_empty() || !st.responses.is_empty()) {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<R: Runtime> Driver<R> {
    /// One pass: what earlier passes and the tasks left to send, then what arrived and what
    /// timed out (its sending is the next pass's).
    fn pass(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.transmit(cx, Instant::now());
        let more = self.receive(cx, Instant::now())?;
        if more {
            // The receive bound was reached: come back after the others have run.
            cx.waker().wake_by_ref();
        }
        // Until a sleep is armed toward a deadline still ahead (one may pass meanwhile).
        while self.poll_timer(cx) {
            self.quic.state.borrow_mut().expire(Instant::now());
        }
        Ok(())
    }
}

/// How long the drain waits, at most, for CONNECTION_CLOSE frames to leave.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(1);
