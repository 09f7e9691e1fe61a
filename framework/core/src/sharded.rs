//! Per-core state, in the spirit of Seastar's `sharded<T>`: one value of `T` on each worker,
//! built on that worker (after pinning, so its memory is local) the first time it is used
//! there, and reached from any core by sending a closure to the owner
//! ([`Sharded::invoke_on`]). The value never crosses a core; only closures and results do.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::mesh::{post_to, run_on, submit_to, MeshError};
use crate::worker::Worker;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's (so this core's) values, by `Sharded` id.
    static SHARDS: RefCell<HashMap<usize, Rc<dyn Any>>> = RefCell::new(HashMap::new());
}

/// A value of `T` per worker. Cloning shares the definition (cheaply); each core still has
/// exactly one value.
pub struct Sharded<T: 'static> {
    id: usize,
    build: Arc<dyn Fn(&Worker) -> T + Send + Sync>,
}

impl<T: 'static> Clone for Sharded<T> {
    fn clone(&self) -> Self {
        Self { id: self.id, build: Arc::clone(&self.build) }
    }
}

impl<T: 'static> Sharded<T> {
    /// Defines the per-core value: `build` runs once on each worker that uses it, on that
    /// worker, with its [`Worker`] handle (its index, its core).
    pub fn new(build: impl Fn(&Worker) -> T + Send + Sync + 'static) -> Self {
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), build: Arc::new(build) }
    }

    /// This core's value, built here on first use. `None` outside a corepin worker.
    pub fn local(&self) -> Option<Rc<T>> {
        let found = SHARDS.with(|s| s.borrow().get(&self.id).cloned());
        let any = match found {
            Some(v) => v,
            None => {
                let worker = Worker::current()?;
                // Built outside the map's borrow, so `build` may itself use other shards.
                let v: Rc<dyn Any> = Rc::new((self.build)(&worker));
                SHARDS.with(|s| s.borrow_mut().entry(self.id).or_insert(v).clone())
            }
        };
        any.downcast::<T>().ok()
    }

    /// Runs `f` with the value of worker `worker` (an index, `0..workers`, as
    /// [`WorkerInfo::index`](crate::worker::WorkerInfo::index)), on that worker, and returns
    /// its result here. On the calling worker itself, `f` still goes through the inbox, so the
    /// order of calls to one worker is the order they were made.
    pub async fn invoke_on<F, U>(&self, worker: usize, f: F) -> Result<U, MeshError>
    where
        F: FnOnce(&T) -> U + Send + 'static,
        U: Send + 'static,
    {
        // Only the definition travels (`Sharded` is `Send` whatever `T` is); the value stays in
        // each core's thread-local map.
        let this = self.clone();
        run_on(worker, move || {
            let value = this.local().expect("invoke_on runs on a worker");
            f(&value)
        })
        .await
    }

    /// Runs `f` with the value of worker `worker`, on that worker, without waiting for it and
    /// without a result (fire and forget, through [`post_to`]); callable from a `poll`
    /// function. `Err` when the worker does not exist or has stopped, or off a worker.
    pub fn post_on<F>(&self, worker: usize, f: F) -> Result<(), MeshError>
    where
        F: FnOnce(&T) + Send + 'static,
    {
        let this = self.clone();
        post_to(worker, move || {
            let value = this.local().expect("post_on runs on a worker");
            f(&value)
        })
    }

    /// Like [`invoke_on`](Self::invoke_on), for work that awaits on the owning core (I/O,
    /// timers): `f` gets the value there and returns a future that runs there.
    pub async fn invoke_on_async<F, Fut, U>(&self, worker: usize, f: F) -> Result<U, MeshError>
    where
        F: FnOnce(Rc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = U> + 'static,
        U: Send + 'static,
    {
        // Only the definition travels (`Sharded` is `Send` whatever `T` is); the value stays in
        // each core's thread-local map.
        let this = self.clone();
        submit_to(worker, move || async move {
            let value = this.local().expect("invoke_on_async runs on a worker");
            f(value).await
        })
        .await
    }

    /// Runs `f` on every worker with its value and collects the results in worker order
    /// (Seastar's `map` over `invoke_on_all`).
    pub async fn map_all<F, U>(&self, f: F) -> Result<Vec<U>, MeshError>
    where
        F: Fn(&T) -> U + Send + Sync + 'static,
        U: Send + 'static,
    {
        let workers = Worker::current().ok_or(MeshError::NotAWorker)?.info().workers;
        let f = Arc::new(f);
        let mut out = Vec::with_capacity(workers);
        for w in 0..workers {
            let f = Arc::clone(&f);
            out.push(self.invoke_on(w, move |v| f(v)).await?);
        }
        Ok(out)
    }
}
