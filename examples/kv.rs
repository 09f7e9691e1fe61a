//! A sharded key-value server speaking a subset of RESP2 (the Redis protocol), written once
//! against corepin: PING, ECHO, GET, SET key value, DEL, EXISTS, DBSIZE. Every worker owns one
//! map (`Sharded`); a key belongs to worker `fnv1a(key) % workers`. A command on a key this
//! connection's worker owns is served in place; any other is sent to the owner as a closure
//! (`invoke_on`) and its answer comes back. The GETs and SETs of one pipeline that belong to
//! another worker travel together, one call per worker. Malformed input gets an `-ERR` and the
//! connection is closed.
//!
//! ```sh
//! cargo run --release --example kv -- --runtime monoio --listen 127.0.0.1:6380
//! redis-cli -p 6380 set hello world && redis-cli -p 6380 get hello    # world
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use corepin::{
    AsyncWriteRentExt, BufResult, ConnStream, Connection, LaunchConfig, Runtime, RuntimeKind, Service, ServiceFactory,
    Sharded, TcpServer, Worker,
};

/// The largest bulk string accepted (Redis allows 512 MiB; this example keeps it smaller).
pub const MAX_BULK: usize = 64 << 20;
/// The most arguments one command may have.
pub const MAX_ARGS: usize = 1 << 20;
/// The most bytes the arguments of one command may add up to.
pub const MAX_COMMAND: usize = 2 * MAX_BULK;
/// The longest `*<n>` or `$<n>` header line (digits, sign, CRLF).
const MAX_HEADER: usize = 32;
/// Replies are written out once this many bytes are pending.
const FLUSH_AT: usize = 64 << 10;

/// One worker's part of the data.
pub type Map = RefCell<HashMap<Vec<u8>, Vec<u8>>>;

/// 64-bit FNV-1a: fixed, so a key's owner is the same in every process and every run.
pub fn fnv1a(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The worker (`0..workers`) that owns `key`.
pub fn owner(key: &[u8], workers: usize) -> usize {
    (fnv1a(key) % workers.max(1) as u64) as usize
}

/// Builds one `Kv` per core; all of them share the definition of the sharded map.
pub struct KvFactory {
    shards: Sharded<Map>,
    local_keys: bool,
}

impl KvFactory {
    /// An empty store: each worker's map is built on that worker when first used.
    pub fn new() -> Self {
        Self { shards: Sharded::new(|_worker: &Worker| RefCell::new(HashMap::new())), local_keys: false }
    }

    /// A benchmark control, not a store: every key is served by the worker its connection
    /// landed on, so nothing is forwarded (and two connections on different workers no longer
    /// see each other's keys). Against the default it measures what forwarding costs.
    pub fn local_keys(mut self) -> Self {
        self.local_keys = true;
        self
    }
}

impl Default for KvFactory {
    fn default() -> Self {
        Self::new()
    }
}

/// The per-core service.
pub struct Kv {
    shards: Sharded<Map>,
    index: usize,
    workers: usize,
    local_keys: bool,
}

impl ServiceFactory for KvFactory {
    type Service<R: Runtime, S: ConnStream> = Kv;
    type Error = std::convert::Infallible;
    fn new_service<R: Runtime, S: ConnStream>(&self, worker: &Worker) -> Result<Kv, Self::Error> {
        let info = worker.info();
        Ok(Kv { shards: self.shards.clone(), index: info.index, workers: info.workers, local_keys: self.local_keys })
    }
}

impl<R: Runtime, S: ConnStream> Service<Connection<R, S>> for Kv {
    type Response = ();
    type Error = io::Error;

    async fn call(&self, mut conn: Connection<R, S>) -> io::Result<()> {
        let mut parser = RespParser::default();
        let mut out = Vec::with_capacity(4096);
        let mut buf = Vec::with_capacity(64 << 10);
        let mut batch = Batch::default();
        loop {
            let BufResult(res, b) = conn.stream.read(buf).await;
            let n = res?;
            if n == 0 {
                return Ok(());
            }
            parser.feed(&b[..n]);
            buf = b;
            // Every complete command in what has arrived, in order; a partial one stays
            // buffered for the next read. GETs and SETs for other workers wait in `batch` and
            // leave as one message per worker; anything else first sends what waits.
            let fatal = loop {
                match parser.next_command() {
                    Ok(Some(args)) => match self.batchable(args) {
                        Ok((w, op)) => {
                            batch.push(w, op);
                            if batch.len() >= BATCH_MAX {
                                self.run_batch(&mut batch, &mut out).await;
                            }
                        }
                        Err(args) => {
                            self.run_batch(&mut batch, &mut out).await;
                            self.execute(args, &mut out).await;
                        }
                    },
                    Ok(None) => break false,
                    Err(e) => {
                        self.run_batch(&mut batch, &mut out).await;
                        out.extend_from_slice(b"-ERR Protocol error: ");
                        out.extend_from_slice(e.as_bytes());
                        out.extend_from_slice(b"\r\n");
                        break true;
                    }
                }
                if out.len() >= FLUSH_AT {
                    out = flush(&mut conn.stream, out).await?;
                }
            };
            self.run_batch(&mut batch, &mut out).await;
            parser.compact();
            if !out.is_empty() {
                out = flush(&mut conn.stream, out).await?;
            }
            if fatal {
                return Ok(());
            }
        }
    }
}

/// Commands of one pipeline that are waiting to run: each has its place in the reply order.
/// A GET or SET on a key this worker owns runs at once; one on another worker's key waits for
/// the others to that worker, and they all travel in one cross-core call.
#[derive(Default)]
struct Batch {
    /// Per worker, the operations to run there with their reply slots.
    to: Vec<Vec<(usize, Op)>>,
    /// Replies in pipeline order (`None` until known).
    replies: Vec<Option<Reply>>,
    pending: usize,
}

impl Batch {
    fn push(&mut self, w: usize, op: Op) {
        if self.to.len() <= w {
            self.to.resize_with(w + 1, Vec::new);
        }
        self.to[w].push((self.replies.len(), op));
        self.replies.push(None);
        self.pending += 1;
    }
    fn len(&self) -> usize {
        self.pending
    }
}

/// A single-key command that can join a batch.
enum Op {
    Get(Vec<u8>),
    Set(Vec<u8>, Vec<u8>),
}

enum Reply {
    Bulk(Option<Vec<u8>>),
    Ok,
}

impl Op {
    fn apply(self, m: &Map) -> Reply {
        match self {
            Op::Get(k) => Reply::Bulk(m.borrow().get(&k).cloned()),
            Op::Set(k, v) => {
                m.borrow_mut().insert(k, v);
                Reply::Ok
            }
        }
    }
}

/// Commands of one pipeline batched before a cross-core call (replies are written in order
/// once all are in).
const BATCH_MAX: usize = 64;

/// Writes `out` and hands it back empty.
async fn flush<S: ConnStream>(stream: &mut S, out: Vec<u8>) -> io::Result<Vec<u8>> {
    let BufResult(res, mut out) = stream.write_all(out).await;
    res?;
    out.clear();
    Ok(out)
}

impl Kv {
    /// Runs one command and appends its reply to `out`.
    async fn execute(&self, mut args: Vec<Vec<u8>>, out: &mut Vec<u8>) {
        let Some(name) = args.first() else { return };
        let name = name.to_ascii_lowercase();
        let arity_ok = match name.as_slice() {
            b"ping" => args.len() <= 2,
            b"echo" | b"get" => args.len() == 2,
            b"set" => args.len() >= 3,
            b"del" | b"exists" => args.len() >= 2,
            b"dbsize" => args.len() == 1,
            _ => {
                out.extend_from_slice(b"-ERR unknown command '");
                push_escaped(out, &args[0]);
                out.extend_from_slice(b"'\r\n");
                return;
            }
        };
        if !arity_ok {
            out.extend_from_slice(b"-ERR wrong number of arguments for '");
            out.extend_from_slice(&name);
            out.extend_from_slice(b"' command\r\n");
            return;
        }
        match name.as_slice() {
            b"ping" if args.len() == 2 => push_bulk(out, Some(&args[1])),
            b"ping" => out.extend_from_slice(b"+PONG\r\n"),
            b"echo" => push_bulk(out, args.get(1).map(Vec::as_slice)),
            b"get" => {
                let key = args.swap_remove(1);
                let w = owner(&key, self.workers);
                match self.on_worker(w, move |m| m.borrow().get(&key).cloned()).await {
                    Ok(v) => push_bulk(out, v.as_deref()),
                    Err(e) => push_error(out, &e),
                }
            }
            b"set" if args.len() > 3 => out.extend_from_slice(b"-ERR syntax error\r\n"),
            b"set" => {
                let value = args.pop().unwrap_or_default();
                let key = args.pop().unwrap_or_default();
                let w = owner(&key, self.workers);
                match self.on_worker(w, move |m| m.borrow_mut().insert(key, value)).await {
                    Ok(_) => out.extend_from_slice(b"+OK\r\n"),
                    Err(e) => push_error(out, &e),
                }
            }
            b"del" | b"exists" => {
                let del = name.as_slice() == b"del";
                // One trip per owning worker, with all its keys.
                let mut by_owner: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.workers.max(1)];
                for key in args.drain(1..) {
                    by_owner[owner(&key, self.workers)].push(key);
                }
                let mut count = 0usize;
                for (w, keys) in by_owner.into_iter().enumerate() {
                    if keys.is_empty() {
                        continue;
                    }
                    let op = move |m: &Map| {
                        if del {
                            let mut m = m.borrow_mut();
                            keys.iter().filter(|k| m.remove(k.as_slice()).is_some()).count()
                        } else {
                            let m = m.borrow();
                            keys.iter().filter(|k| m.contains_key(k.as_slice())).count()
                        }
                    };
                    match self.on_worker(w, op).await {
                        Ok(n) => count += n,
                        Err(e) => return push_error(out, &e),
                    }
                }
                push_int(out, count);
            }
            b"dbsize" => match self.shards.map_all(|m: &Map| m.borrow().len()).await {
                Ok(sizes) => push_int(out, sizes.iter().sum()),
                Err(e) => push_error(out, &e),
            },
            _ => unreachable!("every name was checked above"),
        }
    }

    /// A well-formed GET or SET, with its owning worker; anything else is handed back.
    fn batchable(&self, mut args: Vec<Vec<u8>>) -> Result<(usize, Op), Vec<Vec<u8>>> {
        let op = match args.first().map(|n| n.to_ascii_lowercase()).as_deref() {
            Some(b"get") if args.len() == 2 => Op::Get(args.swap_remove(1)),
            Some(b"set") if args.len() == 3 => {
                let value = args.pop().unwrap_or_default();
                Op::Set(args.pop().unwrap_or_default(), value)
            }
            _ => return Err(args),
        };
        let key = match &op {
            Op::Get(k) | Op::Set(k, _) => k,
        };
        let w = if self.local_keys { self.index } else { owner(key, self.workers) };
        Ok((w, op))
    }

    /// Runs what `batch` holds (this worker's part in place, each other worker's in one call
    /// to it) and appends the replies to `out` in pipeline order.
    async fn run_batch(&self, batch: &mut Batch, out: &mut Vec<u8>) {
        if batch.replies.is_empty() {
            return;
        }
        let mut failed: Option<corepin::mesh::MeshError> = None;
        for w in 0..batch.to.len() {
            if batch.to[w].is_empty() {
                continue;
            }
            let ops = std::mem::take(&mut batch.to[w]);
            let (slots, ops): (Vec<usize>, Vec<Op>) = ops.into_iter().unzip();
            let run = move |m: &Map| ops.into_iter().map(|op| op.apply(m)).collect::<Vec<Reply>>();
            match self.on_worker(w, run).await {
                Ok(replies) => {
                    for (slot, reply) in slots.into_iter().zip(replies) {
                        batch.replies[slot] = Some(reply);
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        for reply in batch.replies.drain(..) {
            match (reply, &failed) {
                (Some(Reply::Bulk(v)), _) => push_bulk(out, v.as_deref()),
                (Some(Reply::Ok), _) => out.extend_from_slice(b"+OK\r\n"),
                (None, Some(e)) => push_error(out, e),
                (None, None) => push_error(out, &"internal error: a batched command got no reply"),
            }
        }
        batch.pending = 0;
    }

    /// Runs `f` on worker `w`'s map: in place when `w` is this connection's worker (no borrow
    /// is held across an await), through that worker's inbox otherwise.
    async fn on_worker<F, U>(&self, w: usize, f: F) -> Result<U, corepin::mesh::MeshError>
    where
        F: FnOnce(&Map) -> U + Send + 'static,
        U: Send + 'static,
    {
        if w == self.index || self.local_keys {
            if let Some(map) = self.shards.local() {
                return Ok(f(&map));
            }
        }
        self.shards.invoke_on(w, f).await
    }
}

fn push_bulk(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            out.push(b'$');
            out.extend_from_slice(v.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"$-1\r\n"),
    }
}

fn push_int(out: &mut Vec<u8>, n: usize) {
    out.push(b':');
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_error(out: &mut Vec<u8>, e: &dyn std::fmt::Display) {
    out.extend_from_slice(b"-ERR ");
    push_escaped(out, e.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Client bytes in a simple-string reply: at most 128 of them, printable ASCII only (so no CR
/// or LF can end the line early).
fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s[..s.len().min(128)].escape_ascii());
}

/// An incremental RESP2 request parser over one connection's buffered bytes: arrays of bulk
/// strings, any of which may arrive split across reads or several to a read. Arguments already
/// complete are kept, so bytes are looked at once (a header may be looked at again).
#[derive(Default)]
pub struct RespParser {
    buf: Vec<u8>,
    pos: usize,
    /// The current command's argument count, once its `*<n>` header is in.
    want: Option<usize>,
    args: Vec<Vec<u8>>,
    arg_bytes: usize,
}

impl RespParser {
    /// Appends bytes read from the connection.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Drops the bytes already parsed (call after `next_command` returned `Ok(None)`).
    pub fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// The next complete command, `Ok(None)` if more bytes are needed, or why the input is not
    /// an acceptable request (the connection should then be closed).
    pub fn next_command(&mut self) -> Result<Option<Vec<Vec<u8>>>, &'static str> {
        loop {
            let want = match self.want {
                Some(w) => w,
                None => {
                    // Blank lines between commands are skipped, as Redis does (`redis-cli
                    // --pipe` sends one before its closing ECHO).
                    match &self.buf[self.pos..] {
                        [b'\n', ..] => {
                            self.pos += 1;
                            continue;
                        }
                        [b'\r', b'\n', ..] => {
                            self.pos += 2;
                            continue;
                        }
                        [b'\r'] => return Ok(None),
                        _ => {}
                    }
                    let Some((n, used)) = self.header(b'*', "expected '*'")? else { return Ok(None) };
                    self.pos += used;
                    if n > MAX_ARGS {
                        return Err("invalid multibulk length");
                    }
                    if n == 0 {
                        continue; // `*0`: nothing to run
                    }
                    self.want = Some(n);
                    self.args = Vec::with_capacity(n.min(64));
                    self.arg_bytes = 0;
                    n
                }
            };
            while self.args.len() < want {
                let Some((len, used)) = self.header(b'$', "expected '$'")? else { return Ok(None) };
                if len > MAX_BULK {
                    return Err("invalid bulk length");
                }
                self.arg_bytes = self.arg_bytes.saturating_add(len);
                if self.arg_bytes > MAX_COMMAND {
                    return Err("command too large");
                }
                let start = self.pos + used;
                let have = self.buf.len() - start;
                if have < len + 2 {
                    self.arg_bytes -= len; // counted again when it is complete
                    self.buf.reserve(len + 2 - have);
                    return Ok(None);
                }
                let rest = &self.buf[start..];
                if &rest[len..len + 2] != b"\r\n" {
                    return Err("bulk string not terminated by CRLF");
                }
                self.args.push(rest[..len].to_vec());
                self.pos = start + len + 2;
            }
            self.want = None;
            return Ok(Some(std::mem::take(&mut self.args)));
        }
    }

    /// Parses a `<kind><decimal>\r\n` line at the current position without consuming it:
    /// `Ok(None)` if it is incomplete, else the number and the line's length.
    fn header(&self, kind: u8, wrong: &'static str) -> Result<Option<(usize, usize)>, &'static str> {
        let rest = &self.buf[self.pos..];
        let Some(&first) = rest.first() else { return Ok(None) };
        if first != kind {
            return Err(wrong);
        }
        let window = &rest[..rest.len().min(MAX_HEADER)];
        let Some(cr) = window.iter().position(|&b| b == b'\r') else {
            return if rest.len() >= MAX_HEADER { Err("header line too long") } else { Ok(None) };
        };
        let Some(&lf) = rest.get(cr + 1) else { return Ok(None) };
        if lf != b'\n' {
            return Err("header line not terminated by CRLF");
        }
        let digits = &rest[1..cr];
        if digits.first() == Some(&b'-') {
            return Err("negative length");
        }
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err("invalid length");
        }
        let n = digits.iter().fold(0usize, |n, &d| n * 10 + usize::from(d - b'0'));
        Ok(Some((n, cr + 2)))
    }
}

#[derive(Parser)]
struct Args {
    /// The backend (see `corepin::RuntimeKind`): monoio, glommio or tokio-uring.
    #[arg(long, default_value = "monoio")]
    runtime: String,
    /// all, a count, or a list such as 0,2-3.
    #[arg(long, default_value = "all")]
    cores: String,
    #[arg(long, default_value = "127.0.0.1:6380")]
    listen: String,
    /// Benchmark control: serve every key on the connection's own worker, forwarding nothing
    /// (workers then disagree about keys). Compared with the default it shows what forwarding
    /// costs; `benches/bench.py --only kv` uses it.
    #[arg(long)]
    local_keys: bool,
    /// How long an idle worker's inbox keeps looking for cross-core calls before it sleeps
    /// (`LaunchConfig::inbox_poll`), in microseconds; 0 sleeps at once.
    #[arg(long, default_value_t = 0)]
    inbox_poll_us: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kind: RuntimeKind = args.runtime.parse()?;
    let cfg = LaunchConfig {
        cores: args.cores.parse()?,
        inbox_poll: std::time::Duration::from_micros(args.inbox_poll_us),
        ..LaunchConfig::default()
    };
    let cpus = cfg.plan()?;
    let addr = args.listen.parse().with_context(|| format!("bad --listen {:?}", args.listen))?;
    let factory = if args.local_keys { KvFactory::new().local_keys() } else { KvFactory::new() };
    let app = TcpServer::bind(addr, cpus.len(), factory)?;
    let server = corepin::start(kind, &cfg, &cpus, Arc::new(app))?;
    println!("kv on {} with {kind} on {} cores", addr, cpus.len());
    server.wait_with_signals()?;
    Ok(())
}
