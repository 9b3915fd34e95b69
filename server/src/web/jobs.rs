//! Graph computations off the async runtime: one dedicated worker thread fed by a bounded queue,
//! requests for a graph already queued or running share that computation, finished graphs are kept in
//! a small LRU cache, and each computation's progress can be watched (by ticket) while it runs.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use app::api::ApiError;
use app::types::GraphData;
use serde::Serialize;
use tokio::sync::watch;

/// Graphs waiting for the worker beyond this are refused with 503 rather than queued for minutes.
pub const QUEUE_DEPTH: usize = 32;
/// Finished graphs kept for instant reloads and parameter toggles.
pub const CACHE_SIZE: usize = 64;
/// Tickets remembered for progress streams.
const TICKETS: usize = 256;

/// Where a computation stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    Queued,
    /// `done` of `total` work units of the engine are finished.
    Running {
        done: usize,
        total: usize,
    },
    Done,
    Failed {
        error: String,
    },
}

/// A finished computation.
pub type Outcome = Result<Arc<GraphData>, ApiError>;
/// Status updates of one computation; the outcome arrives with the last.
pub type Watch = watch::Receiver<(Status, Option<Outcome>)>;

/// What the worker computes for a key, reporting `progress(done, total)`.
pub type Compute<K> =
    dyn Fn(&K, &dyn Fn(usize, usize)) -> Result<GraphData, ApiError> + Send + Sync + 'static;

struct Job<K> {
    key: K,
    status: watch::Sender<(Status, Option<Outcome>)>,
}

struct State<K> {
    cache: HashMap<K, (Arc<GraphData>, u64)>,
    clock: u64,
    running: HashMap<K, Watch>,
    tickets: HashMap<u64, Watch>,
    ticket_order: VecDeque<u64>,
}

/// The graph worker and what it shares with request handlers; clones share them.
pub struct GraphJobs<K> {
    state: Arc<Mutex<State<K>>>,
    queue: SyncSender<Job<K>>,
}

impl<K> Clone for GraphJobs<K> {
    fn clone(&self) -> Self {
        GraphJobs {
            state: Arc::clone(&self.state),
            queue: self.queue.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> GraphJobs<K> {
    /// Starts the worker thread; it stops when the last clone is dropped.
    pub fn start(compute: Arc<Compute<K>>) -> Self {
        let state = Arc::new(Mutex::new(State {
            cache: HashMap::new(),
            clock: 0,
            running: HashMap::new(),
            tickets: HashMap::new(),
            ticket_order: VecDeque::new(),
        }));
        let (queue, jobs) = sync_channel::<Job<K>>(QUEUE_DEPTH);
        let shared = Arc::clone(&state);
        std::thread::Builder::new()
            .name("graph-worker".into())
            .spawn(move || {
                for job in jobs {
                    run_job(&shared, &*compute, job);
                }
            })
            .expect("spawning the graph worker thread");
        GraphJobs { state, queue }
    }

    /// The graph for `key`: from the cache, from a computation already under way, or from a new
    /// one. `ticket`, if given, names the computation for [`Self::watch`].
    pub async fn get(&self, key: K, ticket: Option<u64>) -> Outcome {
        let mut rx = {
            let mut st = lock(&self.state);
            st.clock += 1;
            let now = st.clock;
            if let Some((graph, used)) = st.cache.get_mut(&key) {
                *used = now;
                let graph = Arc::clone(graph);
                if let Some(t) = ticket {
                    let (_, rx) = watch::channel((Status::Done, None));
                    remember(&mut st, t, rx);
                }
                return Ok(graph);
            }
            let rx = match st.running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel((Status::Queued, None));
                    let job = Job {
                        key: key.clone(),
                        status: tx,
                    };
                    match self.queue.try_send(job) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            return Err(ApiError::busy(format!(
                                "{QUEUE_DEPTH} graphs are already waiting; try again shortly"
                            )));
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            return Err(ApiError::internal("the graph worker has stopped"));
                        }
                    }
                    st.running.insert(key, rx.clone());
                    rx
                }
            };
            if let Some(t) = ticket {
                remember(&mut st, t, rx.clone());
            }
            rx
        };
        loop {
            if let Some(outcome) = &rx.borrow_and_update().1 {
                return outcome.clone();
            }
            if rx.changed().await.is_err() {
                return Err(ApiError::internal(
                    "the graph worker dropped the computation",
                ));
            }
        }
    }

    /// The status updates of the computation named `ticket`, if one was started with it.
    pub fn watch(&self, ticket: u64) -> Option<Watch> {
        lock(&self.state).tickets.get(&ticket).cloned()
    }

    /// Graphs in the cache.
    pub fn cached(&self) -> usize {
        lock(&self.state).cache.len()
    }
}

fn lock<K>(state: &Mutex<State<K>>) -> std::sync::MutexGuard<'_, State<K>> {
    // A panic while holding the lock cannot leave the maps half-updated in a harmful way.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn remember<K>(st: &mut State<K>, ticket: u64, rx: Watch) {
    if st.tickets.insert(ticket, rx).is_none() {
        st.ticket_order.push_back(ticket);
    }
    while st.ticket_order.len() > TICKETS {
        if let Some(old) = st.ticket_order.pop_front() {
            st.tickets.remove(&old);
        }
    }
}

fn run_job<K: Clone + Eq + Hash>(state: &Mutex<State<K>>, compute: &Compute<K>, job: Job<K>) {
    let _ = job
        .status
        .send((Status::Running { done: 0, total: 0 }, None));
    let last = std::cell::Cell::new(0usize);
    let progress = |done: usize, total: usize| {
        // About a hundred updates per graph at most.
        let pct = done * 100 / total.max(1);
        if pct != last.get() || done == total {
            last.set(pct);
            let _ = job.status.send((Status::Running { done, total }, None));
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        compute(&job.key, &progress)
    }))
    .unwrap_or_else(|_| Err(ApiError::internal("computing the graph panicked")));
    let outcome = result.map(Arc::new);
    let mut st = lock(state);
    st.running.remove(&job.key);
    if let Ok(graph) = &outcome {
        st.clock += 1;
        let now = st.clock;
        st.cache.insert(job.key.clone(), (Arc::clone(graph), now));
        if st.cache.len() > CACHE_SIZE
            && let Some(oldest) = st
                .cache
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            st.cache.remove(&oldest);
        }
    }
    drop(st);
    let status = match &outcome {
        Ok(_) => Status::Done,
        Err(e) => Status::Failed {
            error: e.message.clone(),
        },
    };
    let _ = job.status.send((status, Some(outcome)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn slow_jobs(calls: Arc<AtomicUsize>) -> GraphJobs<u32> {
        GraphJobs::start(Arc::new(
            move |key: &u32, progress: &dyn Fn(usize, usize)| {
                calls.fetch_add(1, Ordering::SeqCst);
                for i in 1..=4 {
                    std::thread::sleep(Duration::from_millis(25));
                    progress(i, 4);
                }
                if *key == 13 {
                    return Err(ApiError::not_found("no prompt 13"));
                }
                Ok(GraphData {
                    prompt_id: Some(i64::from(*key)),
                    ..GraphData::default()
                })
            },
        ))
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_computation_and_then_the_cache() {
        let calls = Arc::new(AtomicUsize::new(0));
        let jobs = slow_jobs(Arc::clone(&calls));
        let (a, b) = tokio::join!(jobs.get(7, None), jobs.get(7, Some(1)));
        assert_eq!(a.unwrap().prompt_id, Some(7));
        assert_eq!(b.unwrap().prompt_id, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(jobs.get(7, None).await.unwrap().prompt_id, Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "served from the cache");
        assert_eq!(jobs.cached(), 1);
    }

    #[tokio::test]
    async fn failures_are_reported_and_not_cached() {
        let calls = Arc::new(AtomicUsize::new(0));
        let jobs = slow_jobs(Arc::clone(&calls));
        let err = jobs.get(13, None).await.unwrap_err();
        assert_eq!(err.status, 404);
        assert!(jobs.get(13, None).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(jobs.cached(), 0);
    }

    #[tokio::test]
    async fn progress_is_watchable_by_ticket_until_done() {
        let jobs = slow_jobs(Arc::new(AtomicUsize::new(0)));
        let fut = jobs.get(3, Some(42));
        let watcher = async {
            let mut rx = loop {
                if let Some(rx) = jobs.watch(42) {
                    break rx;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let mut seen = vec![];
            loop {
                let status = rx.borrow_and_update().0.clone();
                let done = status == Status::Done;
                seen.push(status);
                if done || rx.changed().await.is_err() {
                    break;
                }
            }
            seen
        };
        let (graph, seen) = tokio::join!(fut, watcher);
        assert!(graph.is_ok());
        assert!(
            seen.contains(&Status::Running { done: 4, total: 4 }) || seen.contains(&Status::Done),
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&Status::Done));
        assert!(jobs.watch(99).is_none());
    }

    #[tokio::test]
    async fn the_cache_forgets_the_least_recently_used() {
        let calls = Arc::new(AtomicUsize::new(0));
        let jobs = GraphJobs::start(Arc::new({
            let calls = Arc::clone(&calls);
            move |key: &u32, _: &dyn Fn(usize, usize)| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(GraphData {
                    prompt_id: Some(i64::from(*key)),
                    ..GraphData::default()
                })
            }
        }));
        for k in 0..=CACHE_SIZE as u32 {
            jobs.get(k, None).await.unwrap();
        }
        assert_eq!(jobs.cached(), CACHE_SIZE);
        let before = calls.load(Ordering::SeqCst);
        jobs.get(CACHE_SIZE as u32, None).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), before, "the newest is kept");
        jobs.get(0, None).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before + 1,
            "the oldest was dropped"
        );
    }
}
