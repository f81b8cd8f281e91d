//! Verbs that outlive their callers. tonic drops a handler's future when
//! its client goes away (the kubelet after its `runtime-request-timeout`),
//! so every `.await` of a verb is a point where it could stop half done.
//! The work of a state-changing verb therefore runs on a task of its own
//! that the caller only awaits: whatever the client does, the work either
//! completes or fails as a whole.
//!
//! A verb retried after such a timeout (the kubelet retries with the same
//! name and attempt) must not race the first call nor be refused because
//! of it: [`InFlight`] makes the retry join the first call while it runs,
//! and answers it with the first call's success for a while after (the
//! client may have missed that answer however close to the end it gave
//! up). A failure leaves nothing behind, so its retry runs the work again;
//! the owner of a kept success forgets it when the object it made goes.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::{Error, Result};

/// How long a success answers retries of its call: longer than the
/// kubelet's two-minute request timeout plus its back-off.
const RETRY_WINDOW: Duration = Duration::from_secs(600);

/// How often the successes past their window are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

type Outcome<T> = std::result::Result<T, Arc<Error>>;

/// Runs `work` on a task of its own and waits for it: dropping the returned
/// future does not stop the work.
pub(super) async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("the call's task failed: {e}"))))
}

/// One verb's calls in flight, by the key that makes two calls the same
/// call (a pod's metadata, a container's name and attempt in its pod, a
/// container id).
pub(super) struct InFlight<K, T: Clone> {
    flights: Arc<Mutex<HashMap<K, Flight<T>>>>,
    serials: AtomicU64,
    /// When expired successes were last swept out (not on every call: a
    /// dense node holds thousands).
    swept: Mutex<Instant>,
}

struct Flight<T: Clone> {
    serial: u64,
    outcome: Shared<BoxFuture<'static, Outcome<T>>>,
    /// When the work succeeded (set once; a failed flight is removed).
    succeeded: Arc<OnceLock<Instant>>,
}

impl<K, T: Clone> Default for InFlight<K, T> {
    fn default() -> Self {
        Self {
            flights: Arc::default(),
            serials: AtomicU64::new(0),
            swept: Mutex::new(Instant::now()),
        }
    }
}

impl<K, T> InFlight<K, T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `work` on a task of its own, unless a call with the same `key`
    /// is running or succeeded within the retry window: then that call's
    /// outcome is the answer and `work` is dropped unrun.
    pub(super) async fn run(
        &self,
        key: K,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let outcome = self.join_or_start(key, work);
        outcome.await.map_err(|e| e.duplicate())
    }

    /// Records `answer` as the success of a call with `key` made to an
    /// earlier agent (the object it made was recovered from the state): a
    /// retry after the restart gets it, as a retry before would have, for
    /// the retry window from now.
    pub(super) fn settled(&self, key: K, answer: T) {
        let succeeded = Arc::new(OnceLock::new());
        let _ = succeeded.set(Instant::now());
        let outcome: BoxFuture<'static, Outcome<T>> = Box::pin(futures::future::ready(Ok(answer)));
        let flight = Flight {
            serial: self.serials.fetch_add(1, Ordering::Relaxed),
            outcome: outcome.shared(),
            succeeded,
        };
        lock(&self.flights).insert(key, flight);
    }

    /// Forgets the call with `key`: the next call with it runs anew (the
    /// object the call made is gone).
    pub(super) fn forget(&self, key: &K) {
        lock(&self.flights).remove(key);
    }

    fn join_or_start(
        &self,
        key: K,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Shared<BoxFuture<'static, Outcome<T>>> {
        let mut flights = lock(&self.flights);
        let now = Instant::now();
        let live = |f: &Flight<T>| {
            f.succeeded
                .get()
                .is_none_or(|at| now.duration_since(*at) < RETRY_WINDOW)
        };
        {
            let mut swept = lock(&self.swept);
            if now.duration_since(*swept) >= SWEEP_EVERY {
                flights.retain(|_, f| live(f));
                *swept = now;
            }
        }
        match flights.get(&key) {
            Some(flight) if live(flight) => return flight.outcome.clone(),
            Some(_) => {
                flights.remove(&key);
            }
            None => {}
        }
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let succeeded = Arc::new(OnceLock::new());
        let landing = Landing {
            flights: self.flights.clone(),
            key: Some(key.clone()),
            serial,
            succeeded: succeeded.clone(),
        };
        let task = tokio::spawn(async move {
            let mut landing = landing;
            let outcome = work.await.map_err(Arc::new);
            landing.land(outcome.is_ok());
            outcome
        });
        let outcome: BoxFuture<'static, Outcome<T>> = Box::pin(async move {
            task.await.unwrap_or_else(|e| {
                Err(Arc::new(Error::Internal(format!(
                    "the call's task failed: {e}"
                ))))
            })
        });
        let outcome = outcome.shared();
        flights.insert(
            key,
            Flight {
                serial,
                outcome: outcome.clone(),
                succeeded,
            },
        );
        outcome
    }

    /// Calls in flight or unclaimed, for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.flights).len()
    }
}

/// Ends a flight when its work ends: a success stays for the retry window,
/// anything else, a panic included, is removed at once.
struct Landing<K: Eq + Hash, T: Clone> {
    flights: Arc<Mutex<HashMap<K, Flight<T>>>>,
    key: Option<K>,
    serial: u64,
    succeeded: Arc<OnceLock<Instant>>,
}

impl<K: Eq + Hash, T: Clone> Landing<K, T> {
    fn land(&mut self, ok: bool) {
        if ok {
            let _ = self.succeeded.set(Instant::now());
            self.key = None;
        }
    }
}

impl<K: Eq + Hash, T: Clone> Drop for Landing<K, T> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            remove_flight(&self.flights, &key, self.serial);
        }
    }
}

fn remove_flight<K: Eq + Hash, T: Clone>(
    flights: &Mutex<HashMap<K, Flight<T>>>,
    key: &K,
    serial: u64,
) {
    let mut flights = lock(flights);
    if flights.get(key).is_some_and(|f| f.serial == serial) {
        flights.remove(key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Work that counts its runs and finishes when `release` says so.
    fn work(
        runs: &Arc<AtomicUsize>,
        release: &tokio::sync::watch::Sender<bool>,
        answer: Result<u32>,
    ) -> impl Future<Output = Result<u32>> + Send + 'static {
        let runs = runs.clone();
        let mut release = release.subscribe();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = release.wait_for(|r| *r).await;
            answer
        }
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_stop_the_work_and_its_retry_gets_the_outcome() {
        let calls = InFlight::<&str, u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::watch::channel(false);
        let first = calls.run("pod", work(&runs, &release, Ok(7)));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), first)
                .await
                .is_err()
        );
        release.send_replace(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(calls.len(), 1, "the success is kept");
        let retry = calls.run("pod", work(&runs, &release, Ok(8))).await;
        assert_eq!(retry.unwrap(), 7, "the retry gets the first call's outcome");
        let again = calls.run("pod", work(&runs, &release, Ok(8))).await;
        assert_eq!(again.unwrap(), 7, "and so does the next, within the window");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the work ran once");
        calls.forget(&"pod");
        assert_eq!(
            calls
                .run("pod", work(&runs, &release, Ok(9)))
                .await
                .unwrap(),
            9
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "a forgotten call runs anew");
    }

    #[tokio::test]
    async fn a_call_settled_by_an_earlier_agent_answers_its_retry() {
        let calls = InFlight::<&str, u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::watch::channel(true);
        calls.settled("c", 4);
        assert_eq!(
            calls.run("c", work(&runs, &release, Ok(5))).await.unwrap(),
            4
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0, "the work did not run");
        calls.forget(&"c");
        assert_eq!(
            calls.run("c", work(&runs, &release, Ok(5))).await.unwrap(),
            5
        );
    }

    #[tokio::test]
    async fn a_call_with_the_key_of_one_running_waits_for_it() {
        let calls = Arc::new(InFlight::<&str, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::watch::channel(false);
        let first = tokio::spawn({
            let calls = calls.clone();
            let w = work(&runs, &release, Ok(1));
            async move { calls.run("c", w).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = tokio::spawn({
            let calls = calls.clone();
            let w = work(&runs, &release, Ok(2));
            async move { calls.run("c", w).await }
        });
        let other = calls.run("d", work(&runs, &release, Ok(3)));
        release.send_replace(true);
        assert_eq!(other.await.unwrap(), 3);
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per key");
    }

    #[tokio::test]
    async fn a_failure_whose_caller_went_away_leaves_nothing_behind() {
        let calls = InFlight::<&str, u32>::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::watch::channel(false);
        let first = calls.run(
            "c",
            work(&runs, &release, Err(Error::Internal("no".into()))),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(20), first)
                .await
                .is_err()
        );
        release.send_replace(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(calls.len(), 0);
        assert_eq!(
            calls.run("c", work(&runs, &release, Ok(5))).await.unwrap(),
            5
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the retry ran the work again"
        );
    }

    fn boom() -> u32 {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_panicking_work_is_an_internal_error_and_is_forgotten() {
        let calls = InFlight::<&str, u32>::default();
        let err = calls.run("c", async { Ok(boom()) }).await.unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err}");
        assert_eq!(calls.len(), 0);
    }

    #[tokio::test]
    async fn detached_work_finishes_without_its_caller() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let call = detached(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(());
            Ok(())
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(5), call)
                .await
                .is_err()
        );
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the work went on")
            .unwrap();
    }
}
