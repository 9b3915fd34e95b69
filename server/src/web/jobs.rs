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

/// Where a graph a request got came from (the HTTP API says it in `x-graph-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Computed for this request (or for an identical one it joined).
    Computed,
    /// This process's cache of finished graphs.
    Memory,
    /// The sidecar file's cache, from before a restart.
    Disk,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Computed => "computed",
            Source::Memory => "memory",
            Source::Disk => "disk",
        }
    }
}

/// Called on the worker thread with each graph it computed, after the requests have it.
pub type Finished<K> = dyn Fn(&K, &Arc<GraphData>) + Send + Sync + 'static;

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
        Self::start_with(compute, Arc::new(|_: &K, _: &Arc<GraphData>| {}))
    }

    /// As [`Self::start`], handing every computed graph to `finished` once it is delivered (the
    /// service writes it to the sidecar there, off the request's path).
    pub fn start_with(compute: Arc<Compute<K>>, finished: Arc<Finished<K>>) -> Self {
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
                    let key = job.key.clone();
                    if let Some(graph) = run_job(&shared, &*compute, job) {
                        finished(&key, &graph);
                    }
                }
            })
            .expect("spawning the graph worker thread");
        GraphJobs { state, queue }
    }

    /// The graph for `key`: from the cache, from a computation already under way, or from a new
    /// one. `ticket`, if given, names the computation for [`Self::watch`].
    pub async fn get(&self, key: K, ticket: Option<u64>) -> Outcome {
        self.get_from(key, ticket).await.0
    }

    /// As [`Self::get`], saying whether the graph was cached or computed.
    pub async fn get_from(&self, key: K, ticket: Option<u64>) -> (Outcome, Source) {
        let mut rx = {
            let mut st = lock(&self.state);
            if let Some(graph) = cache_hit(&mut st, &key, ticket) {
                return (Ok(graph), Source::Memory);
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
                            let busy = ApiError::busy(format!(
                                "{QUEUE_DEPTH} graphs are already waiting; try again shortly"
                            ));
                            return (Err(busy), Source::Computed);
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            let gone = ApiError::internal("the graph worker has stopped");
                            return (Err(gone), Source::Computed);
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
                return (outcome.clone(), Source::Computed);
            }
            if rx.changed().await.is_err() {
                let dropped = ApiError::internal("the graph worker dropped the computation");
                return (Err(dropped), Source::Computed);
            }
        }
    }

    /// The graph for `key` if this process has it finished (`ticket` then reads as done).
    pub fn cached_graph(&self, key: &K, ticket: Option<u64>) -> Option<Arc<GraphData>> {
        cache_hit(&mut lock(&self.state), key, ticket)
    }

    /// Puts a graph found elsewhere (the sidecar) into the cache, as if computed here; `ticket`
    /// then reads as done.
    pub fn insert(&self, key: K, graph: Arc<GraphData>, ticket: Option<u64>) {
        let mut st = lock(&self.state);
        cache_insert(&mut st, key.clone(), graph);
        cache_hit(&mut st, &key, ticket);
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

/// A finished graph of `key`, marked as just used.
fn cache_hit<K: Eq + Hash>(
    st: &mut State<K>,
    key: &K,
    ticket: Option<u64>,
) -> Option<Arc<GraphData>> {
    st.clock += 1;
    let now = st.clock;
    let (graph, used) = st.cache.get_mut(key)?;
    *used = now;
    let graph = Arc::clone(graph);
    if let Some(t) = ticket {
        let (_, rx) = watch::channel((Status::Done, None));
        remember(st, t, rx);
    }
    Some(graph)
}

/// Keeps `graph`, dropping the least recently used beyond [`CACHE_SIZE`].
fn cache_insert<K: Clone + Eq + Hash>(st: &mut State<K>, key: K, graph: Arc<GraphData>) {
    st.clock += 1;
    let now = st.clock;
    st.cache.insert(key, (graph, now));
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

/// Computes one job and delivers its outcome; the graph, if one was made.
fn run_job<K: Clone + Eq + Hash>(
    state: &Mutex<State<K>>,
    compute: &Compute<K>,
    job: Job<K>,
) -> Option<Arc<GraphData>> {
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
        cache_insert(&mut st, job.key.clone(), Arc::clone(graph));
    }
    drop(st);
    let status = match &outcome {
        Ok(_) => Status::Done,
        Err(e) => Status::Failed {
            error: e.message.clone(),
        },
    };
    let graph = outcome.as_ref().ok().map(Arc::clone);
    let _ = job.status.send((status, Some(outcome)));
    graph
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
    async fn sources_are_told_and_finished_graphs_handed_on_once() {
        let handed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&handed);
        let jobs = GraphJobs::start_with(
            Arc::new(|key: &u32, _: &dyn Fn(usize, usize)| {
                if *key == 13 {
                    return Err(ApiError::not_found("no prompt 13"));
                }
                Ok(GraphData {
                    prompt_id: Some(i64::from(*key)),
                    ..GraphData::default()
                })
            }),
            Arc::new(move |key: &u32, g: &Arc<GraphData>| {
                lock_vec(&seen).push((*key, g.prompt_id));
            }),
        );
        let (g, src) = jobs.get_from(3, None).await;
        assert_eq!((g.unwrap().prompt_id, src), (Some(3), Source::Computed));
        assert_eq!(jobs.get_from(3, None).await.1, Source::Memory);
        assert!(jobs.get_from(13, None).await.0.is_err());
        assert!(jobs.cached_graph(&5, None).is_none());
        let found = Arc::new(GraphData {
            prompt_id: Some(50),
            ..GraphData::default()
        });
        jobs.insert(5, found, Some(77));
        assert_eq!(jobs.cached_graph(&5, None).unwrap().prompt_id, Some(50));
        assert_eq!(jobs.watch(77).unwrap().borrow().0, Status::Done);
        // The hook runs on the worker after delivery: wait for it to see graph 3.
        for _ in 0..100 {
            if !lock_vec(&handed).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            *lock_vec(&handed),
            vec![(3, Some(3))],
            "computed graphs only, once"
        );
    }

    fn lock_vec<T>(m: &Mutex<Vec<T>>) -> std::sync::MutexGuard<'_, Vec<T>> {
        m.lock().unwrap()
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
