//! A Redis that stalls, dies, comes back or goes silent on an open connection: every
//! keyed request is answered in bounded time (a `RedisStore` on one server bounds each
//! step by its response timeout, and the protocol's store timeout bounds any other
//! store), a claim that timed out and lands later never runs a key twice nor holds it, a
//! step applied twice is safe, and memory stays bounded on a stalled connection.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{AppState, Counters, post_with, send};
use idem_runtime::store::{BoxFuture, RedisStore, Store, StoreError};
use idem_runtime::{Idempotency, IdempotencyBuilder, Idempotent, Problem};
use testkit::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- helpers

async fn store_on(url: &str, prefix: &str, response: Duration) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .response_timeout(response)
        .connection_timeout(response)
        .connect()
        .await
        .unwrap_or_else(|error| panic!("Redis at {url}: {error}"))
}

fn prefix(test: &str) -> String {
    testkit::unique_prefix(test)
}

/// Polls an async condition every 20 ms until `within` has passed.
async fn until_async<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// idem on `store`, with a store timeout far past the store's response timeout: what
/// these tests see bounded, the store bounds.
fn idem_on(store: impl Store) -> IdempotencyBuilder {
    Idempotency::builder()
        .store(store)
        .shared_scope(true)
        .store_timeout(Duration::from_secs(60))
}

/// A keyed request to the gated route `path` whose handler runs, then finishes while the
/// server stands still: its answer, and how long it took after the handler finished.
async fn finished_on_a_stalled_server(
    router: &Router,
    counters: &Arc<Counters>,
    server: &RedisServer,
    path: &'static str,
) -> (common::Answer, Duration) {
    let first = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with(path, Some("k"), "")).await }
    });
    assert!(until_async(Duration::from_secs(10), || async { counters.runs() == 1 }).await);
    server.pause();
    let started = Instant::now();
    counters.gate.notify_one();
    let answer = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the request was held past 20 s on a stalled server")
        .unwrap();
    let took = started.elapsed();
    server.resume();
    (answer, took)
}

fn x_run(answer: &common::Answer) -> Option<String> {
    answer
        .headers
        .get("x-run")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Waits on the gate, then answers 500: a failure found after the store stalled.
async fn gated_500(idem: Idempotent, State(counters): State<AppState>) -> Response {
    idem.run(async move {
        counters.runs.fetch_add(1, Ordering::SeqCst);
        counters.gate.notified().await;
        counters.finished.fetch_add(1, Ordering::SeqCst);
        (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned())
    })
    .await
}

fn app(idem: &Idempotency, counters: AppState) -> Router {
    common::routes(counters.clone())
        .merge(
            Router::new()
                .route("/gated500", post(gated_500))
                .with_state(counters),
        )
        .layer(idem.layer())
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

// ---------------------------------------------------------------- a Redis TCP proxy

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    /// Forward the command, let the server answer it, then close the client's
    /// connection without passing the answer on (the step applied, its answer lost).
    CutAfterReply,
    /// Forward the command and everything after it; pass no answer on ever again on
    /// that connection (which stays open).
    Stall,
}

#[derive(Default)]
struct ProxyState {
    trigger: std::sync::Mutex<Option<(Vec<u8>, Action)>>,
    fired: AtomicUsize,
}

struct RedisProxy {
    url: String,
    state: Arc<ProxyState>,
}

impl RedisProxy {
    async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, shared.clone()));
            }
        });
        Self {
            url: format!("redis://{addr}"),
            state,
        }
    }

    /// The next command holding `pattern` (on any connection) gets `action`.
    fn arm(&self, pattern: &[u8], action: Action) {
        *self.state.trigger.lock().unwrap() = Some((pattern.to_vec(), action));
    }

    fn fired(&self) -> usize {
        self.state.fired.load(Ordering::SeqCst)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn pipe(mut client: TcpStream, mut server: TcpStream, state: Arc<ProxyState>) {
    let (mut c_read, mut c_write) = client.split();
    let (mut s_read, mut s_write) = server.split();
    let mut cbuf = vec![0u8; 64 * 1024];
    let mut sbuf = vec![0u8; 64 * 1024];
    let mut mode: Option<Action> = None;
    loop {
        tokio::select! {
            read = c_read.read(&mut cbuf) => {
                let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                {
                    let mut trigger = state.trigger.lock().unwrap();
                    if mode.is_none()
                        && let Some((pattern, action)) = trigger.as_ref()
                        && contains(&cbuf[..n], pattern)
                    {
                        mode = Some(*action);
                        *trigger = None;
                        state.fired.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if s_write.write_all(&cbuf[..n]).await.is_err() { break; }
            }
            read = s_read.read(&mut sbuf) => {
                let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                match mode {
                    Some(Action::CutAfterReply) => break,
                    Some(Action::Stall) => continue,
                    None => if c_write.write_all(&sbuf[..n]).await.is_err() { break; },
                }
            }
        }
    }
    let _ = client.set_zero_linger();
}

// ---------------------------------------------------------------- 1. bounded answers

/// A begin on a stalled server: answered `503` within the response timeout, the store
/// timeout being far longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_begin_answers_within_the_response_timeout() {
    let server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g1b"), Duration::from_millis(300)).await).build();
    let router = app(&idem, Arc::new(Counters::default()));
    server.pause();
    let started = Instant::now();
    let answer = send(&router, post_with("/pay", Some("k"), "{}")).await;
    let took = started.elapsed();
    server.resume();
    answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
}

/// The handler ran; the completion stalls: the client is answered within a bound, and
/// once the server answers again a retry replays, never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_completion_answers_in_bounded_time_and_replays_after() {
    let server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g1c"), Duration::from_millis(300)).await).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    let (answer, took) = finished_on_a_stalled_server(&router, &counters, &server, "/gated").await;
    assert!(
        took < Duration::from_secs(2),
        "answered after {took:?}: {answer:?}"
    );
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let replayed = until_async(Duration::from_secs(10), || {
        let router = router.clone();
        async move {
            let again = send(&router, post_with("/gated", Some("k"), "")).await;
            again.status == StatusCode::CREATED && again.is_replay()
        }
    })
    .await;
    // A retry that ran the handler again would wait on the gate: release it.
    counters.gate.notify_waiters();
    assert!(replayed, "a retry replays once the server answers again");
    assert_eq!(counters.runs(), 1, "the handler ran once");
}

/// The lease keeper renews while the server stalls: the request still ends in bounded
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_renewals_do_not_hold_the_request() {
    let server = RedisServer::start();
    let idem = idem_on(store_on(&server.url(), &prefix("g1r"), Duration::from_millis(200)).await)
        .lease(Duration::from_millis(600))
        .build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    let started = Instant::now();
    let request = tokio::spawn({
        let router = router.clone();
        async move { send(&router, post_with("/slow", Some("k"), "1500")).await }
    });
    assert!(until_async(Duration::from_secs(10), || async { counters.runs() == 1 }).await);
    server.pause();
    let answer = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("stalled renewals hold the request unboundedly")
        .unwrap();
    let took = started.elapsed();
    server.resume();
    // 1.5 s of work, a completion timed out (0.2 s), generous slack.
    assert!(
        took < Duration::from_secs(4),
        "answered after {took:?}: {answer:?}"
    );
    assert_eq!(idem.shutdown(Duration::from_secs(10)).await, 0);
}

/// A `5xx` releases the key on a stalled server: answered in bounded time; the release
/// goes on in the background and frees the key once the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_of_a_5xx_on_a_stalled_server_is_bounded_and_frees_the_key() {
    let server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g1f"), Duration::from_millis(300)).await).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    let (answer, took) =
        finished_on_a_stalled_server(&router, &counters, &server, "/gated500").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // The key is free again: a retry runs (and waits on the gate).
    let rerun = until_async(Duration::from_secs(10), || async {
        let router = router.clone();
        let again =
            tokio::spawn(async move { send(&router, post_with("/gated500", Some("k"), "")).await });
        let ran = until_async(Duration::from_millis(300), || async {
            counters.runs() == 2
        })
        .await;
        counters.gate.notify_one();
        let _ = again.await;
        ran
    })
    .await;
    assert!(rerun, "the key is released once the server answers again");
}

/// A request dropped while its claim is unanswered on a stalled server: the release on
/// drop settles within the response timeout (a shutdown waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_drop_settles_in_bounded_time() {
    let server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g1d"), Duration::from_millis(300)).await).build();
    let router = app(&idem, Arc::new(Counters::default()));
    server.pause();
    for i in 0..5 {
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            send(&router, post_with("/pay", Some(&format!("k{i}")), "{}")),
        )
        .await;
        assert!(dropped.is_err(), "the stalled claim answered: {dropped:?}");
    }
    let started = Instant::now();
    let unsettled = idem.shutdown(Duration::from_secs(20)).await;
    let took = started.elapsed();
    server.resume();
    assert_eq!(unsettled, 0);
    assert!(
        took < Duration::from_secs(2),
        "releases settled after {took:?}"
    );
}

/// `ready()` on a stalled server: a timeout, within the response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_on_a_stalled_server_fails_within_the_response_timeout() {
    let server = RedisServer::start();
    let limit = Duration::from_millis(300);
    let idem = Idempotency::builder()
        .store(store_on(&server.url(), &prefix("g1y"), limit).await)
        .store_timeout(Duration::from_secs(60))
        .build();
    assert!(idem.ready().await.is_ok());
    server.pause();
    let started = Instant::now();
    let ready = idem.ready().await;
    let took = started.elapsed();
    server.resume();
    assert!(
        matches!(ready, Err(StoreError::Timeout(t)) if t == limit),
        "{ready:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        until_async(Duration::from_secs(10), || async {
            idem.ready().await.is_ok()
        })
        .await,
        "ready again once the server answers"
    );
}

/// Killed, then restarted: requests are refused in bounded time while the server is
/// gone, and served once it is back (the restart costs no further request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_answer_in_bounded_time_then_serve() {
    let mut server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g1k"), Duration::from_millis(300)).await).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    assert_eq!(
        send(&router, post_with("/pay", Some("before"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    server.kill();
    for i in 0..3 {
        let started = Instant::now();
        let answer = send(&router, post_with("/pay", Some(&format!("gone{i}")), "{}")).await;
        let took = started.elapsed();
        answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
        assert!(took < Duration::from_secs(2), "answered after {took:?}");
        let started = Instant::now();
        assert!(idem.ready().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    server.restart();
    let served = until_async(Duration::from_secs(10), || async {
        send(&router, post_with("/pay", Some("after"), "{}"))
            .await
            .status
            == StatusCode::CREATED
    })
    .await;
    assert!(served, "served once the server is back");
}

/// Connecting to a stalled server (it accepts the connection and answers nothing) fails
/// in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_stalled_server_fails_in_bounded_time() {
    let server = RedisServer::start();
    server.pause();
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let connected = tokio::time::timeout(
        Duration::from_secs(60),
        RedisStore::builder(server.url())
            .prefix(prefix("g1n"))
            .response_timeout(limit)
            .connection_timeout(limit)
            .connect(),
    )
    .await;
    let took = started.elapsed();
    server.resume();
    let connected = connected.expect("connect hangs on a stalled server");
    assert!(connected.is_err(), "connected to a stalled server");
    assert!(
        took < Duration::from_secs(3),
        "connect with connection and response timeouts of 300 ms failed after {took:?}"
    );
}

/// The server stalls at each step of `connect` after the connection is made (script
/// loads, CONFIG GET, INFO, the probe's begin and scripts): each fails in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_stalled_at_each_of_its_steps_fails_in_bounded_time() {
    let server = RedisServer::start();
    let limit = Duration::from_millis(300);
    let steps: [&[u8]; 5] = [
        b"SCRIPT",
        b"CONFIG",
        // Not "INFO": the handshake's CLIENT SETINFO holds it.
        b"$4\r\nINFO",
        b"*7\r\n$3\r\nSET",
        b"EVALSHA",
    ];
    let mut report = Vec::new();
    for pattern in steps {
        let proxy = RedisProxy::start(server.port()).await;
        proxy.arm(pattern, Action::Stall);
        let started = Instant::now();
        let connected = tokio::time::timeout(
            Duration::from_secs(60),
            RedisStore::builder(proxy.url.clone())
                .prefix(prefix("g1s"))
                .response_timeout(limit)
                .connection_timeout(limit)
                .connect(),
        )
        .await;
        let took = started.elapsed();
        let pattern = String::from_utf8_lossy(pattern).into_owned();
        assert_eq!(proxy.fired(), 1, "{pattern:?} was sent at connect");
        let Ok(connected) = connected else {
            report.push(format!("{pattern:?}: hangs"));
            continue;
        };
        if connected.is_ok() || took >= Duration::from_secs(2) {
            report.push(format!(
                "{pattern:?}: {:?} after {took:?}",
                connected.map(drop)
            ));
        }
    }
    assert!(report.is_empty(), "{report:#?}");
}

// ---------------------------------------------------------------- 2. one execution

/// Claims that timed out on a stalled server land when it wakes: no retry runs the
/// handler beside another or twice, and the key runs (once) soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_land_late_never_run_twice() {
    let server = RedisServer::start();
    let idem =
        idem_on(store_on(&server.url(), &prefix("g2"), Duration::from_millis(250)).await).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    server.pause();
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let router = router.clone();
        stalled.push(tokio::spawn(async move {
            send(&router, post_with("/pay", Some("k"), "{}")).await
        }));
    }
    for answer in stalled {
        let answer = answer.await.unwrap();
        answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    }
    server.resume();
    // Waves of concurrent retries until one runs; every later one replays that run.
    let mut runs_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !runs_seen.iter().any(|(s, _)| *s == StatusCode::CREATED) {
        let mut wave = Vec::new();
        for _ in 0..6 {
            let router = router.clone();
            wave.push(tokio::spawn(async move {
                send(&router, post_with("/pay", Some("k"), "{}")).await
            }));
        }
        for answer in wave {
            let answer = answer.await.unwrap();
            runs_seen.push((answer.status, x_run(&answer)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        runs_seen.iter().any(|(s, _)| *s == StatusCode::CREATED),
        "the key never ran after the server woke: {runs_seen:?}"
    );
    let again = send(&router, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.is_replay());
    assert_eq!(counters.runs(), 1, "{runs_seen:?}");
}

/// A stall longer than the lease: the late-release loop has given up before the server
/// wakes, and the queued claim lands then with a fresh lease. The key must still be free
/// promptly after the server answers again (not held a whole lease by a ghost claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_the_lease_leaves_no_ghost_claim() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(4);
    let idem = idem_on(store_on(&server.url(), &prefix("g2l"), Duration::from_millis(250)).await)
        .lease(lease)
        .build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    server.pause();
    send(&router, post_with("/pay", Some("k"), "{}"))
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    tokio::time::sleep(lease + Duration::from_secs(1)).await;
    server.resume();
    let woke = Instant::now();
    let ran = until_async(Duration::from_secs(10), || async {
        send(&router, post_with("/pay", Some("k"), "{}"))
            .await
            .status
            == StatusCode::CREATED
    })
    .await;
    let took = woke.elapsed();
    assert!(ran);
    assert!(
        took < lease / 2,
        "the key stayed held {took:?} after the server answered again (lease {lease:?})"
    );
    assert_eq!(counters.runs(), 1);
}

// ---------------------------------------------------------------- 3. applied twice

async fn proxied_idem(server: &RedisServer, test: &str) -> (RedisProxy, Idempotency) {
    let proxy = RedisProxy::start(server.port()).await;
    let store = store_on(&proxy.url, &prefix(test), Duration::from_millis(500)).await;
    let idem = idem_on(store).build();
    (proxy, idem)
}

/// The begin's answer is lost with its connection: the resend finds its own claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_applied_twice_runs_once() {
    let server = RedisServer::start();
    let (proxy, idem) = proxied_idem(&server, "g3b").await;
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    proxy.arm(b"*7\r\n$3\r\nSET", Action::CutAfterReply);
    let answer = send(&router, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(proxy.fired(), 1);
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let again = send(&router, post_with("/pay", Some("k"), "{}")).await;
    assert!(again.is_replay(), "{again:?}");
    assert_eq!(counters.runs(), 1);
}

/// The completion's answer is lost: the resend finds its own record; a retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_applied_twice_replays() {
    let server = RedisServer::start();
    let (proxy, idem) = proxied_idem(&server, "g3c").await;
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    // EVALSHA sha 1 key claim record ttl: the completion.
    proxy.arm(b"*7\r\n$7\r\nEVALSHA", Action::CutAfterReply);
    let answer = send(&router, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(proxy.fired(), 1);
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    let again = send(&router, post_with("/pay", Some("k"), "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{again:?}");
    assert!(again.is_replay(), "{again:?}");
    assert_eq!(counters.runs(), 1);
}

/// The release's answer is lost (after a `5xx`): the resend finds nothing, and the key
/// is free for a retry at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_applied_twice_frees_the_key() {
    let server = RedisServer::start();
    let (proxy, idem) = proxied_idem(&server, "g3r").await;
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    // EVALSHA sha 1 key claim: the release.
    proxy.arm(b"*5\r\n$7\r\nEVALSHA", Action::CutAfterReply);
    let first = send(&router, post_with("/fail", Some("k"), "")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy.fired(), 1);
    let second = send(&router, post_with("/fail", Some("k"), "")).await;
    assert_eq!(second.status, StatusCode::CREATED, "{second:?}");
    assert_eq!(counters.runs(), 2);
}

/// A renewal's answer is lost while the work runs: the work still completes and stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_applied_twice_keeps_the_lease() {
    let server = RedisServer::start();
    let proxy = RedisProxy::start(server.port()).await;
    let store = store_on(&proxy.url, &prefix("g3n"), Duration::from_millis(500)).await;
    let idem = idem_on(store).lease(Duration::from_millis(900)).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    // EVALSHA sha 1 key claim millis: a renewal.
    proxy.arm(b"*6\r\n$7\r\nEVALSHA", Action::CutAfterReply);
    let answer = send(&router, post_with("/slow", Some("k"), "1200")).await;
    assert_eq!(proxy.fired(), 1);
    assert_eq!(answer.status, StatusCode::CREATED);
    let again = send(&router, post_with("/slow", Some("k"), "1200")).await;
    assert!(again.is_replay(), "{again:?}");
    assert_eq!(counters.runs(), 1);
}

// ---------------------------------------------------------------- 4. opaque stores

/// A store idem cannot see into: the store timeout must bound its steps.
struct Wrapper(RedisStore);

impl Store for Wrapper {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.0.begin(key, claim, lease)
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.renew(key, claim, lease)
    }
    fn complete<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.complete(key, claim, record, ttl)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        claim: &'a Bytes,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.0.release(key, claim)
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.0.ping()
    }
}

async fn bounded_by_store_timeout(idem: Idempotency, server: &RedisServer, what: &str) {
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    server.pause();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        send(&router, post_with("/pay", Some("k"), "{}")),
    )
    .await;
    let took = started.elapsed();
    let started = Instant::now();
    let ready = tokio::time::timeout(Duration::from_secs(20), idem.ready()).await;
    let ready_took = started.elapsed();
    server.resume();
    let answer = answer.unwrap_or_else(|_| panic!("{what}: request not answered in 20 s"));
    answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert!(
        took < Duration::from_secs(2),
        "{what}: answered after {took:?}"
    );
    let ready = ready.unwrap_or_else(|_| panic!("{what}: ready() not answered in 20 s"));
    assert!(
        matches!(ready, Err(StoreError::Timeout(t)) if t == Duration::from_millis(300)),
        "{what}: {ready:?}"
    );
    assert!(
        ready_took < Duration::from_secs(2),
        "{what}: ready after {ready_took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_store_steps_are_bounded_by_the_store_timeout() {
    let server = RedisServer::start();
    let store = store_on(&server.url(), &prefix("g4s"), Duration::from_secs(60)).await;
    let idem = Idempotency::builder()
        .shared_store(Arc::new(store))
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .build();
    bounded_by_store_timeout(idem, &server, "shared_store").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_store_steps_are_bounded_by_the_store_timeout() {
    let server = RedisServer::start();
    let store = store_on(&server.url(), &prefix("g4w"), Duration::from_secs(60)).await;
    let idem = Idempotency::builder()
        .store(Wrapper(store))
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .build();
    bounded_by_store_timeout(idem, &server, "wrapper").await;
}

/// The store given first as a `RedisStore` (bounding its steps by 300 ms), then replaced
/// by a wrapper around one that waits 60 s: the wrapper's steps must be timed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_store_does_not_keep_the_first_ones_bound() {
    let server = RedisServer::start();
    let quick = store_on(&server.url(), &prefix("g4q"), Duration::from_millis(300)).await;
    let slow = store_on(&server.url(), &prefix("g4l"), Duration::from_secs(60)).await;
    let idem = Idempotency::builder()
        .store(quick)
        .store(Wrapper(slow))
        .shared_scope(true)
        .store_timeout(Duration::from_millis(300))
        .build();
    bounded_by_store_timeout(idem, &server, "replaced").await;
}

// ---------------------------------------------------------------- 5. memory

/// Thousands of keyed requests while the server stalls, then it wakes: memory and tasks
/// stay bounded, and every key is free afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_on_a_stalled_connection_stay_bounded() {
    let server = RedisServer::start();
    let prefix = prefix("g5");
    let idem = idem_on(store_on(&server.url(), &prefix, Duration::from_millis(100)).await)
        .lease(Duration::from_secs(3))
        .build();
    let router = app(&idem, Arc::new(Counters::default()));
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss();
    server.pause();
    let mut max_tasks = 0;
    for wave in 0..20 {
        let mut requests = Vec::new();
        for i in 0..200 {
            let router = router.clone();
            let key = format!("w{wave}-{i}");
            requests.push(tokio::spawn(async move {
                send(&router, post_with("/pay", Some(&key), "{}"))
                    .await
                    .status
            }));
        }
        for request in requests {
            assert_eq!(request.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
        }
        max_tasks = max_tasks.max(metrics.num_alive_tasks());
    }
    let rss_paused = rss();
    server.resume();
    // After the wake, and past the lease, every retry loop has ended.
    let settled = until_async(Duration::from_secs(15), || async {
        metrics.num_alive_tasks() <= tasks_before + 8
    })
    .await;
    let mut admin = testkit::redis_connection(&server.url()).await;
    let left = testkit::keys_under(&mut admin, &prefix).await;
    assert!(
        max_tasks <= tasks_before + 1024 + 300,
        "{max_tasks} tasks alive while stalled (before: {tasks_before})"
    );
    assert!(
        rss_paused.saturating_sub(rss_before) < 64 << 20,
        "RSS grew by {} MiB while stalled",
        (rss_paused - rss_before) >> 20
    );
    assert!(
        settled,
        "{} tasks still alive after the wake (before: {tasks_before})",
        metrics.num_alive_tasks()
    );
    assert!(
        left.iter().all(|key| key.ends_with("__ready")),
        "{} keys left after the wake: {:?}",
        left.len(),
        &left[..left.len().min(5)]
    );
}

// ---------------------------------------------------------------- a cluster

/// On a cluster every node stalls: the request is answered within a bound (the
/// response timeout is 300 ms, the store timeout 60 s), and once the nodes answer again a
/// retry runs soon, not a lease (30 s) later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_cluster_answers_in_bounded_time_and_frees_the_key() {
    let cluster = testkit::RedisCluster::start(3);
    let store = RedisStore::cluster_builder(cluster.urls())
        .prefix(prefix("gc"))
        .response_timeout(Duration::from_millis(300))
        .connection_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let idem = idem_on(store).build();
    let counters = Arc::new(Counters::default());
    let router = app(&idem, counters.clone());
    assert_eq!(
        send(&router, post_with("/pay", Some("warm"), "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    for node in cluster.nodes() {
        node.pause();
    }
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        send(&router, post_with("/pay", Some("k"), "{}")),
    )
    .await;
    let took = started.elapsed();
    for node in cluster.nodes() {
        node.resume();
    }
    let woke = Instant::now();
    let ran = until_async(Duration::from_secs(10), || async {
        send(&router, post_with("/pay", Some("k"), "{}"))
            .await
            .status
            == StatusCode::CREATED
    })
    .await;
    let freed_after = woke.elapsed();
    let answer = answer.expect("not answered within 60 s");
    answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(
        ran,
        "the key was still held {freed_after:?} after the cluster woke"
    );
    assert_eq!(counters.runs(), 2);
}

/// A flapping server (paused and resumed again and again, requests throughout): the store
/// serves soon after it stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_server_is_served_after_it_settles() {
    let server = RedisServer::start();
    let store = store_on(&server.url(), &prefix("flap"), Duration::from_millis(150)).await;
    let idem = idem_on(store).lease(Duration::from_secs(1)).build();
    let counters = Arc::new(Counters::default());
    let router = common::app(&idem, counters.clone());
    for i in 0..8 {
        server.pause();
        let mut reqs = Vec::new();
        for j in 0..10 {
            let router = router.clone();
            reqs.push(tokio::spawn(async move {
                send(&router, post_with("/pay", Some(&format!("f{i}-{j}")), "{}"))
                    .await
                    .status
            }));
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        server.resume();
        for r in reqs {
            let _ = r.await.unwrap();
        }
    }
    let started = Instant::now();
    let served = until_async(Duration::from_secs(10), || async {
        send(&router, post_with("/pay", Some("settled"), "{}"))
            .await
            .status
            == StatusCode::CREATED
    })
    .await;
    assert!(
        served,
        "not served {:?} after the server settled",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let again = send(&router, post_with("/pay", Some("settled"), "{}")).await;
    assert!(again.is_replay());
}
