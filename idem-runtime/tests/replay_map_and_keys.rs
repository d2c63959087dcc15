//! Replays byte for byte over a real socket (header counts from 0 to 300, many values of
//! one name, large values, statuses with and without bodies, a handler's own
//! `content-length` or `transfer-encoding`), the largest header maps, keys (every
//! visible character, quoted and bare forms, lengths, refused bytes), the store key
//! `scope-hex:key` computed independently of idem's own hex code (records of older builds
//! are still found), one key from two clients, and many callers of one key, on the memory
//! store's direct path, the same store through `dyn Store`, and Redis.
//!
//! Every check is on what a user sees: status, headers, body bytes, the handler's run
//! count, and what the store holds.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/wire.rs"]
mod wire;

/// Three tests of one check: on the memory store's direct path, on the same store
/// through `dyn Store`, and on Redis.
macro_rules! on_every_store {
    ($check:expr => $direct:ident, $shared:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $direct() {
            ($check)(Via::Direct).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $shared() {
            ($check)(Via::Shared).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redis() {
            ($check)(Via::Redis).await;
        }
    };
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use common::{Answer, post_with, send};
use idem_runtime::fingerprint::{Fingerprint, FingerprintMode};
use idem_runtime::record::{FencingToken, Record, StoredResponse};
use idem_runtime::store::{MemoryStore, RedisStore, Store};
use idem_runtime::{
    HeaderPolicy, Idempotency, IdempotencyBuilder, IdempotencyKey, Idempotent, Principal, Problem,
    Scope, ScopedKey,
};
use sha2::{Digest, Sha256};
use tokio::sync::{Barrier, Semaphore, mpsc};
use wire::{Conn, Wire};

// ---------------------------------------------------------------------------------------
// Independent computations of what idem must produce.
// ---------------------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 16 bytes of a scope, as documented: SHA-256 of "idem-scope-v1", a tag, the value's
/// length (u64 BE), the value and the host; the first 16 bytes.
fn scope_bytes(tag: u8, value: &[u8], host: &[u8]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(b"idem-scope-v1");
    hasher.update([tag]);
    hasher.update((value.len() as u64).to_be_bytes());
    hasher.update(value);
    hasher.update(host);
    let digest = hasher.finalize();
    let mut out = [0; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn anonymous_hex() -> String {
    hex(&scope_bytes(0, b"", b""))
}

/// The store key of `key` in the shared scope of a request without a host.
fn anonymous_store_key(key: &str) -> String {
    format!("{}:{key}", anonymous_hex())
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Stores: the memory store's direct path, the same store through `dyn Store`, Redis.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// `builder().store(MemoryStore)`: steps called directly.
    Direct,
    /// `builder().shared_store(Arc<dyn Store>)` holding a `MemoryStore`: steps as futures.
    Shared,
    /// `RedisStore` on the shared server, under a unique prefix.
    Redis,
}

struct Harness {
    idem: Idempotency,
    memory: Option<MemoryStore>,
    prefix: Option<String>,
}

async fn harness(
    via: Via,
    test: &str,
    configure: impl FnOnce(IdempotencyBuilder) -> IdempotencyBuilder,
) -> Harness {
    let builder = Idempotency::builder().shared_scope(true);
    match via {
        Via::Direct => {
            let memory = MemoryStore::new();
            let idem = configure(builder.store(memory.clone())).build();
            Harness {
                idem,
                memory: Some(memory),
                prefix: None,
            }
        }
        Via::Shared => {
            let memory = MemoryStore::new();
            let store: Arc<dyn Store> = Arc::new(memory.clone());
            let idem = configure(builder.shared_store(store)).build();
            Harness {
                idem,
                memory: Some(memory),
                prefix: None,
            }
        }
        Via::Redis => {
            let prefix = testkit::unique_prefix(&format!("replay-map-{test}"));
            let url = testkit::shared_redis_url();
            let store = RedisStore::builder(url.as_str())
                .prefix(prefix.as_str())
                .connect()
                .await
                .unwrap_or_else(|error| panic!("Redis at {url} must be running: {error}"));
            let idem = configure(builder.store(store)).build();
            Harness {
                idem,
                memory: None,
                prefix: Some(prefix),
            }
        }
    }
}

impl Harness {
    /// What the store holds under `key` (the full `scope-hex:key`), read through the store
    /// itself; a key found absent is left absent.
    async fn peek(&self, key: &str) -> Option<Bytes> {
        let store = self.idem.store();
        let probe = Record::InProgress {
            fingerprint: Fingerprint::of(&FingerprintMode::Exact, &Method::GET, "/probe", b""),
            token: FencingToken::generate(),
        }
        .encode();
        match store
            .begin(key, &probe, Duration::from_secs(5))
            .await
            .unwrap()
        {
            Some(found) => Some(found),
            None => {
                assert!(store.release(key, &probe).await.unwrap());
                None
            }
        }
    }

    /// Writes `record` under `key` as another (older) process would: claim, then complete.
    async fn plant(&self, key: &str, record: Bytes) {
        let store = self.idem.store();
        let claim = Record::InProgress {
            fingerprint: Fingerprint::of(&FingerprintMode::Exact, &Method::GET, "/plant", b""),
            token: FencingToken::generate(),
        }
        .encode();
        assert_eq!(
            store
                .begin(key, &claim, Duration::from_secs(30))
                .await
                .unwrap(),
            None,
            "the key was free"
        );
        assert!(
            store
                .complete(key, &claim, record, Duration::from_secs(600))
                .await
                .unwrap()
        );
    }

    /// The raw Redis keys under this test's prefix.
    async fn redis_keys(&self) -> Vec<String> {
        let prefix = self.prefix.as_deref().expect("a Redis harness");
        let mut connection = testkit::redis_connection(&testkit::shared_redis_url()).await;
        let mut keys = testkit::keys_under(&mut connection, prefix).await;
        keys.sort();
        keys
    }

    /// Deletes what this test wrote on the shared Redis.
    async fn cleanup(&self) {
        if self.prefix.is_none() {
            return;
        }
        let keys = self.redis_keys().await;
        let mut connection = testkit::redis_connection(&testkit::shared_redis_url()).await;
        for key in keys {
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
}

fn completed(record: &Bytes) -> StoredResponse {
    match Record::decode(record).expect("a record idem can read") {
        Record::Completed(response) => response,
        other => panic!("expected a completed record, found {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// A scripted handler: the response each id answers is set by the test.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Spec {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Sent as a stream of 3-byte chunks, with no length known.
    stream: bool,
}

impl Spec {
    fn new(status: u16) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = body.as_ref().to_vec();
        self
    }

    /// The headers as a `HeaderMap` iterates them (grouped by name, first-seen order),
    /// minus what `policy` leaves out.
    fn expected_headers(&self, policy: &HeaderPolicy) -> Vec<(String, Vec<u8>)> {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map.iter()
            .filter(|(name, _)| policy.keeps(name))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect()
    }
}

#[derive(Default)]
struct Scripts {
    specs: Mutex<HashMap<String, Spec>>,
    runs: Mutex<HashMap<String, usize>>,
}

impl Scripts {
    fn set(&self, id: &str, spec: Spec) {
        self.specs.lock().unwrap().insert(id.to_owned(), spec);
    }

    fn runs(&self, id: &str) -> usize {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

async fn scripted(
    Path(id): Path<String>,
    State(scripts): State<Arc<Scripts>>,
    idem: Idempotent,
) -> Response {
    idem.run(async move {
        let spec = scripts.specs.lock().unwrap()[&id].clone();
        *scripts.runs.lock().unwrap().entry(id).or_default() += 1;
        let body = if spec.stream {
            let chunks: Vec<Result<Bytes, std::io::Error>> = spec
                .body
                .chunks(3)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from(spec.body.clone())
        };
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::from_u16(spec.status).unwrap();
        for (name, value) in &spec.headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        response
    })
    .await
}

fn scripted_app(idem: &Idempotency, scripts: Arc<Scripts>) -> Router {
    Router::new()
        .route("/s/{id}", post(scripted).get(scripted))
        .with_state(scripts)
        .layer(idem.layer())
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client over a real socket.
// ---------------------------------------------------------------------------------------

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn raw_request(method: &str, path: &str, key: Option<&[u8]>, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n").into_bytes();
    if let Some(key) = key {
        out.extend_from_slice(b"idempotency-key: ");
        out.extend_from_slice(key);
        out.extend_from_slice(b"\r\n");
    }
    if method != "GET" && method != "HEAD" {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Runs `spec` under `id` once and replays it twice on one keep-alive connection, then
/// checks framing with one more exchange; returns (first, replay).
async fn first_and_replay(
    addr: SocketAddr,
    scripts: &Scripts,
    id: &str,
    spec: Spec,
    method: &str,
) -> (Wire, Wire) {
    scripts.set(id, spec);
    let head = method == "HEAD";
    let path = format!("/s/{id}");
    let key = format!("key-{id}");
    let request = raw_request(method, &path, Some(key.as_bytes()), b"");
    let mut conn = Conn::open(addr).await;
    let first = conn.exchange(&request, head).await;
    let replay = conn.exchange(&request, head).await;
    let again = conn.exchange(&request, head).await;
    assert_eq!(scripts.runs(id), 1, "{id}: the handler ran once");
    assert!(!first.is_replay(), "{id}: the first answer is no replay");
    assert!(replay.is_replay(), "{id}: {:?}", replay.headers);
    assert_eq!(again.status, replay.status, "{id}");
    assert_eq!(again.without(&["date"]), replay.without(&["date"]), "{id}");
    assert_eq!(again.body, replay.body, "{id}");
    // A last exchange on the same connection: anything left over from a wrong length
    // would be read as its status line.
    let ping = conn.exchange(&request, head).await;
    assert!(
        ping.is_replay(),
        "{id}: framing held on a reused connection"
    );
    (first, replay)
}

/// The replay is the first answer byte for byte (status, headers in order, body), plus
/// the mark; both carry exactly the expected headers and a content-length equal to the
/// body length they sent.
fn assert_same_answer(id: &str, spec: &Spec, policy: &HeaderPolicy, first: &Wire, replay: &Wire) {
    assert_eq!(first.status, spec.status, "{id}: first status");
    assert_eq!(replay.status, spec.status, "{id}: replay status");
    assert_eq!(first.body, replay.body, "{id}: body");
    let no_body = spec.status == 204 || spec.status == 304;
    if !no_body {
        assert_eq!(replay.body, spec.body, "{id}: replayed body");
    } else {
        assert!(replay.body.is_empty());
    }
    let spec_has_length = spec
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    let mut ignore = vec!["date", "idempotent-replayed"];
    if !spec_has_length {
        ignore.push("content-length");
    }
    assert_eq!(
        replay.without(&ignore),
        spec.expected_headers(policy),
        "{id}: replayed headers in order"
    );
    let first_kept: Vec<_> = first
        .without(&ignore)
        .into_iter()
        .filter(|(n, _)| policy.keeps(&HeaderName::from_bytes(n.as_bytes()).unwrap()))
        .collect();
    assert_eq!(
        first_kept,
        replay.without(&ignore),
        "{id}: first (less what the policy leaves out) and replay headers"
    );
    assert_eq!(
        first.all("content-length"),
        replay.all("content-length"),
        "{id}: content-length"
    );
    if !no_body && replay.all("transfer-encoding").is_empty() {
        let lengths = replay.all("content-length");
        assert_eq!(lengths.len(), 1, "{id}: {:?}", replay.headers);
        assert_eq!(
            std::str::from_utf8(lengths[0]).unwrap(),
            replay.body.len().to_string(),
            "{id}: content-length"
        );
    }
    // The mark comes once, after the stored headers.
    assert_eq!(replay.all("idempotent-replayed").len(), 1);
}

fn numbered(count: usize, value_len: usize) -> Spec {
    let mut spec = Spec::new(201).body(format!("{count} headers"));
    for n in 0..count {
        let value = format!("{n:0>width$}", width = value_len.max(1));
        spec = spec.header(&format!("x-h-{n:03}"), value);
    }
    spec
}

// ---------------------------------------------------------------------------------------
// 1. Replays over a real socket.
// ---------------------------------------------------------------------------------------

async fn replay_over_socket_header_counts(via: Via) {
    let h = harness(via, "socket_counts", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let addr = serve(scripted_app(&h.idem, scripts.clone())).await;
    let policy = HeaderPolicy::default();
    for count in [0, 1, 2, 3, 4, 5, 6, 11, 12, 13, 22, 23, 24, 40, 47, 48, 300] {
        let id = format!("count-{count}");
        let spec = numbered(count, 4);
        let (first, replay) = first_and_replay(addr, &scripts, &id, spec.clone(), "POST").await;
        assert_same_answer(&id, &spec, &policy, &first, &replay);
    }
    h.cleanup().await;
}

on_every_store!(
    replay_over_socket_header_counts =>
    replay_over_socket_header_counts_direct,
    replay_over_socket_header_counts_shared,
    replay_over_socket_header_counts_redis
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_over_socket_many_values_large_values_and_statuses() {
    let h = harness(Via::Direct, "socket_shapes", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let addr = serve(scripted_app(&h.idem, scripts.clone())).await;
    let policy = HeaderPolicy::default();

    // Many values of one name, interleaved with other names, plus excluded headers.
    let mut multi = Spec::new(200).body("multi");
    for n in 0..150 {
        multi = multi.header("x-multi", format!("v{n}"));
        if n % 10 == 0 {
            multi = multi.header(&format!("x-between-{n}"), "b");
        }
    }
    multi = multi
        .header("set-cookie", "a=b")
        .header("date", "Tue, 24 Nov 2026 00:00:00 GMT")
        .header("x-multi", "last");
    // Large header values and a large body.
    let big = "v".repeat(16 * 1024);
    let large = Spec::new(201)
        .header("x-large-1", &big)
        .header("x-large-2", "w".repeat(60 * 1024))
        .header("content-type", "application/octet-stream")
        .header("x-large-1", &big)
        .body((0..=255u8).cycle().take(700 * 1024).collect::<Vec<u8>>());
    // Values with obs-text bytes, an empty value, tabs inside.
    let odd = Spec::new(202)
        .header("x-binary", b"caf\xe9 \x80\xff")
        .header("x-empty", "")
        .header("x-tab", "a\tb")
        .body(b"\x00\x01\xfe\xff");
    let cases = [
        ("multi", multi),
        ("large", large),
        ("odd", odd),
        ("empty-200", Spec::new(200)),
        ("empty-201-headers", Spec::new(201).header("x-a", "1")),
        ("no-content", Spec::new(204).header("x-a", "1")),
        ("not-modified", Spec::new(304).header("etag", "\"abc\"")),
        (
            "teapot",
            Spec::new(418).header("x-a", "1").body("short and stout"),
        ),
        ("not-found-empty", Spec::new(404)),
        ("odd-2xx", Spec::new(299).body("odd")),
        (
            "redirect",
            Spec::new(303).header("location", "/elsewhere").body("see"),
        ),
    ];
    for (id, spec) in cases {
        let (first, replay) = first_and_replay(addr, &scripts, id, spec.clone(), "POST").await;
        assert_same_answer(id, &spec, &policy, &first, &replay);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_over_socket_handler_sets_content_length() {
    let h = harness(Via::Direct, "socket_cl", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let addr = serve(scripted_app(&h.idem, scripts.clone())).await;
    let policy = HeaderPolicy::default();
    let cases = [
        (
            "cl-first",
            Spec::new(201)
                .header("content-length", "11")
                .header("x-a", "1")
                .body("hello world"),
        ),
        (
            "cl-last",
            Spec::new(200)
                .header("x-a", "1")
                .header("x-b", "2")
                .header("content-length", "5")
                .body("hello"),
        ),
        ("cl-zero", Spec::new(200).header("content-length", "0")),
    ];
    for (id, spec) in cases {
        let (first, replay) = first_and_replay(addr, &scripts, id, spec.clone(), "POST").await;
        assert_same_answer(id, &spec, &policy, &first, &replay);
        assert_eq!(replay.all("content-length").len(), 1, "{id}");
    }
}

fn streamed_spec(set_te: bool) -> Spec {
    let mut spec = Spec::new(201).header("x-a", "1");
    if set_te {
        spec = spec.header("transfer-encoding", "chunked");
    }
    let mut spec = spec
        .header("x-b", "2")
        .body("a streamed body of some length");
    spec.stream = true;
    spec
}

/// A handler streaming its body with `transfer-encoding: chunked` set itself (valid
/// HTTP, and served fine without a key): with a key, the first answer and a replay must
/// reach the client whole.
async fn streamed_with_transfer_encoding(policy: HeaderPolicy, set_te: bool, replay_only: bool) {
    let h = harness(Via::Direct, "socket_te", |b| {
        b.replay_headers(policy.clone())
    })
    .await;
    let scripts = Arc::new(Scripts::default());
    let addr = serve(scripted_app(&h.idem, scripts.clone())).await;
    let spec = streamed_spec(set_te);
    scripts.set("te", spec.clone());
    // Control: without a key (idem does not protect it) the handler's answer arrives.
    let mut conn = Conn::open(addr).await;
    let plain = conn
        .exchange(&raw_request("POST", "/s/te", None, b""), false)
        .await;
    assert_eq!(plain.status, 201);
    assert_eq!(plain.body, spec.body, "without a key");
    assert_eq!(scripts.runs("te"), 1);

    let request = raw_request("POST", "/s/te", Some(b"key-te"), b"");
    let first = Conn::open(addr).await.try_exchange(&request, false).await;
    assert_eq!(scripts.runs("te"), 2, "the keyed request ran once");
    if !replay_only {
        let first = first.expect("the first keyed answer reaches the client");
        assert_eq!(first.status, 201);
        assert_eq!(first.body, spec.body, "first body");
    }
    let mut conn = Conn::open(addr).await;
    let replay = conn.exchange(&request, false).await;
    let again = conn.exchange(&request, false).await;
    assert_eq!(scripts.runs("te"), 2, "replays never run");
    for replay in [&replay, &again] {
        assert_eq!(replay.status, 201);
        assert!(replay.is_replay());
        assert_eq!(replay.body, spec.body, "replayed body");
        let ignore = [
            "date",
            "idempotent-replayed",
            "content-length",
            "transfer-encoding",
        ];
        assert_eq!(
            replay.without(&ignore),
            vec![
                ("x-a".to_owned(), b"1".to_vec()),
                ("x-b".to_owned(), b"2".to_vec())
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_streamed_body_without_transfer_encoding_header_first_and_replay() {
    streamed_with_transfer_encoding(HeaderPolicy::default(), false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_handler_sets_transfer_encoding_first_answer_arrives() {
    streamed_with_transfer_encoding(HeaderPolicy::default(), true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_handler_sets_transfer_encoding_replay_default_policy() {
    streamed_with_transfer_encoding(HeaderPolicy::default(), true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_handler_sets_transfer_encoding_replay_all_headers_kept() {
    streamed_with_transfer_encoding(HeaderPolicy::all(), true, true).await;
}

/// In process, through the router: the keyed first answer and the replay of a handler that
/// set `transfer-encoding: chunked` never carry a `content-length` beside it (RFC 9112
/// 6.2: a sender must not send both; hyper refuses to write such a head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_answers_never_carry_both_transfer_encoding_and_content_length() {
    for policy in [HeaderPolicy::default(), HeaderPolicy::all()] {
        let h = harness(Via::Direct, "te_in_process", |b| {
            b.replay_headers(policy.clone())
        })
        .await;
        let scripts = Arc::new(Scripts::default());
        let app = scripted_app(&h.idem, scripts.clone());
        scripts.set("te", streamed_spec(true));
        let plain = send(
            &app,
            Request::builder()
                .method(Method::POST)
                .uri("/s/te")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert!(
            !(plain.headers.contains_key(header::TRANSFER_ENCODING)
                && plain.headers.contains_key(header::CONTENT_LENGTH)),
            "control, without a key: {:?}",
            plain.headers
        );
        let (first, replay) = in_process_pair(&app, "te").await;
        for (which, answer) in [("first", &first), ("replay", &replay)] {
            assert!(
                !(answer.headers.contains_key(header::TRANSFER_ENCODING)
                    && answer.headers.contains_key(header::CONTENT_LENGTH)),
                "{policy:?} {which}: {:?}",
                answer.headers
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_over_socket_head_request() {
    let h = harness(Via::Direct, "socket_head", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let addr = serve(scripted_app(&h.idem, scripts.clone())).await;
    let spec = Spec::new(200).header("x-a", "1").body("twelve bytes");
    let (first, replay) = first_and_replay(addr, &scripts, "head", spec, "HEAD").await;
    assert_eq!(first.status, 200);
    assert_eq!(replay.status, 200);
    assert!(first.body.is_empty() && replay.body.is_empty());
    assert_eq!(first.all("content-length"), [b"12".as_slice()]);
    assert_eq!(replay.all("content-length"), [b"12".as_slice()]);
    assert_eq!(replay.all("x-a"), [b"1".as_slice()]);
    // The same key on GET is another request: refused, not run, not the HEAD's answer.
    let mut conn = Conn::open(addr).await;
    let get = conn
        .exchange(
            &raw_request("GET", "/s/head", Some(b"key-head"), b""),
            false,
        )
        .await;
    assert_eq!(get.status, 422);
    assert_eq!(scripts.runs("head"), 1);
}

// ---------------------------------------------------------------------------------------
// 2. Replays in process: every header count around the map's growth points, many values
//    of one name (a wide record), and the largest maps a replay can hold.
// ---------------------------------------------------------------------------------------

async fn in_process_pair(app: &Router, id: &str) -> (Answer, Answer) {
    let request = || {
        Request::builder()
            .method(Method::POST)
            .uri(format!("/s/{id}"))
            .header("idempotency-key", format!("key-{id}"))
            .body(Body::empty())
            .unwrap()
    };
    let first = send(app, request()).await;
    let replay = send(app, request()).await;
    (first, replay)
}

fn header_list(map: &HeaderMap, skip: &[&str]) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .filter(|(n, _)| !skip.contains(&n.as_str()))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_in_process_every_count_to_100_names_and_values() {
    for via in [Via::Direct, Via::Shared] {
        let h = harness(via, "counts", |b| b).await;
        let scripts = Arc::new(Scripts::default());
        let app = scripted_app(&h.idem, scripts.clone());
        for count in 0..=100 {
            for distinct in [true, false] {
                let id = format!("{count}-{distinct}");
                let mut spec = Spec::new(201).body(format!("body {id}"));
                for n in 0..count {
                    let name = if distinct {
                        format!("x-n-{n}")
                    } else {
                        format!("x-n-{}", n % 3)
                    };
                    spec = spec.header(&name, format!("{n}"));
                }
                scripts.set(&id, spec.clone());
                let (first, replay) = in_process_pair(&app, &id).await;
                assert_eq!(scripts.runs(&id), 1, "{via:?} {id}");
                assert_eq!(replay.status, StatusCode::CREATED, "{via:?} {id}");
                assert!(replay.is_replay(), "{via:?} {id}");
                assert_eq!(replay.body, spec.body, "{via:?} {id}");
                assert_eq!(first.body, replay.body);
                let skip = ["idempotent-replayed", "content-length"];
                assert_eq!(
                    header_list(&replay.headers, &skip),
                    spec.expected_headers(&HeaderPolicy::default()),
                    "{via:?} {id}"
                );
                assert_eq!(
                    header_list(&first.headers, &skip),
                    header_list(&replay.headers, &skip),
                    "{via:?} {id}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_70000_values_of_one_name_is_whole() {
    let h = harness(Via::Direct, "wide", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let app = scripted_app(&h.idem, scripts.clone());
    let mut spec = Spec::new(200).header("x-first", "1").body("wide");
    for n in 0..70_000u32 {
        spec = spec.header("x-many", n.to_string());
    }
    spec = spec.header("x-last", "2");
    scripts.set("wide", spec.clone());
    let (first, replay) = in_process_pair(&app, "wide").await;
    assert_eq!(scripts.runs("wide"), 1);
    assert!(replay.is_replay());
    assert_eq!(replay.body, Bytes::from_static(b"wide"));
    let skip = ["idempotent-replayed", "content-length"];
    assert_eq!(
        header_list(&replay.headers, &skip),
        spec.expected_headers(&HeaderPolicy::default())
    );
    assert_eq!(
        header_list(&first.headers, &skip),
        header_list(&replay.headers, &skip)
    );
}

/// The most names a stored response can have (the map's largest usable size, less the
/// two a replay adds) replays whole; one more is not stored, and a retry is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_replayable_map_replays_and_one_more_is_not_stored() {
    for via in [Via::Direct, Via::Shared] {
        let h = harness(via, "largest", |b| b).await;
        let scripts = Arc::new(Scripts::default());
        let app = scripted_app(&h.idem, scripts.clone());
        for (names, stored) in [(24_574usize, true), (24_575, false)] {
            let id = format!("names-{names}");
            let mut spec = Spec::new(201).body("many names");
            for n in 0..names {
                spec = spec.header(&format!("x-{n}"), "v");
            }
            scripts.set(&id, spec.clone());
            let (first, replay) = in_process_pair(&app, &id).await;
            assert_eq!(scripts.runs(&id), 1, "{via:?} {id}");
            assert_eq!(first.status, StatusCode::CREATED);
            assert_eq!(
                first.headers.keys_len(),
                names + 1,
                "{via:?} {id}: + length"
            );
            if stored {
                assert!(replay.is_replay(), "{via:?} {id}: {:?}", replay.status);
                assert_eq!(replay.headers.keys_len(), names + 2);
                assert_eq!(replay.body, spec.body);
                let skip = ["idempotent-replayed", "content-length"];
                assert_eq!(
                    header_list(&first.headers, &skip),
                    header_list(&replay.headers, &skip)
                );
            } else {
                replay.assert_problem(StatusCode::CONFLICT, Problem::RESPONSE_NOT_STORED);
            }
        }
    }
}

/// A record another process wrote, with more names than a replay has room for beside its
/// mark and length: answered 503 (as a damaged record), never a panic; the largest
/// replayable one (two names fewer than the map's limit) replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_records_at_the_map_limit_replay_or_answer_503_never_panic() {
    let h = harness(Via::Direct, "planted_limit", |b| b).await;
    let scripts = Arc::new(Scripts::default());
    let app = scripted_app(&h.idem, scripts.clone());
    for (names, replays) in [
        (24_574usize, true),
        (24_575, false),
        (24_576, false),
        (30_000, false),
    ] {
        let id = format!("planted-{names}");
        let key = format!("key-{id}");
        let fingerprint = Fingerprint::of(
            &FingerprintMode::Exact,
            &Method::POST,
            &format!("/s/{id}"),
            b"",
        );
        let headers = (0..names)
            .map(|n| {
                (
                    HeaderName::from_bytes(format!("x-{n}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                )
            })
            .collect();
        let record = Record::Completed(StoredResponse {
            fingerprint,
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"planted"),
            expires_at_ms: now_ms() + 600_000,
        })
        .encode();
        h.plant(&anonymous_store_key(&key), record).await;
        scripts.set(&id, Spec::new(500));
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/s/{id}"))
            .header("idempotency-key", key.as_str())
            .body(Body::empty())
            .unwrap();
        let answer = tokio::spawn({
            let app = app.clone();
            async move { send(&app, request).await }
        })
        .await
        .unwrap_or_else(|error| panic!("{id}: the replay panicked: {error}"));
        assert_eq!(scripts.runs(&id), 0, "{id}: a stored key never runs");
        if replays {
            assert!(answer.is_replay(), "{id}: {:?}", answer.status);
            assert_eq!(answer.body, Bytes::from_static(b"planted"));
            assert_eq!(answer.headers.keys_len(), names + 2);
        } else {
            answer.assert_problem(StatusCode::SERVICE_UNAVAILABLE, Problem::STORE_UNAVAILABLE);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Keys.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Runs {
    runs: AtomicUsize,
}

/// 201 `run {n} key {key as idem saw it}`.
async fn counted(idem: Idempotent, State(runs): State<Arc<Runs>>, body: Bytes) -> Response {
    let seen = idem
        .key()
        .map(|k| k.key().as_str().to_owned())
        .unwrap_or_default();
    idem.run(async move {
        let n = runs.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let mut response = Response::new(Body::from(format!(
            "run {n} key {seen} body {}",
            body.len()
        )));
        *response.status_mut() = StatusCode::CREATED;
        response.headers_mut().insert("x-run", HeaderValue::from(n));
        response
    })
    .await
}

fn counted_app(idem: &Idempotency, runs: Arc<Runs>) -> Router {
    Router::new()
        .route("/pay", post(counted))
        .with_state(runs)
        .layer(idem.layer())
}

fn keyed(value: &[u8]) -> Request {
    let mut request = post_with("/pay", None, "same body");
    request.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes(value).expect("a header value"),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_visible_ascii_key_runs_once_and_is_stored_under_its_own_name() {
    let h = harness(Via::Direct, "ascii", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let mut keys: Vec<String> = (0x21u8..=0x7e)
        .filter(|&b| b != b'"')
        .map(|b| char::from(b).to_string())
        .collect();
    keys.extend((0x21u8..=0x7e).map(|b| format!("a{}z", char::from(b))));
    keys.push(
        (0x21u8..=0x7e)
            .map(char::from)
            .filter(|&c| c != '"')
            .collect(),
    );
    keys.push(format!(
        "k{}",
        (0x21u8..=0x7e).map(char::from).collect::<String>()
    ));
    let mut seen = std::collections::HashSet::new();
    for key in &keys {
        let first = send(&app, keyed(key.as_bytes())).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{key:?}: {:?}",
            first.body
        );
        assert!(
            seen.insert(first.body.clone()),
            "{key:?} got another key's answer"
        );
        let body = String::from_utf8(first.body.to_vec()).unwrap();
        assert!(
            body.ends_with(&format!(" key {key} body 9")),
            "{key:?}: {body}"
        );
        let again = send(&app, keyed(key.as_bytes())).await;
        assert!(again.is_replay(), "{key:?}");
        assert_eq!(again.body, first.body, "{key:?}");
        // Stored under `scope-hex:key`, the key byte for byte.
        let stored = h
            .peek(&anonymous_store_key(key))
            .await
            .unwrap_or_else(|| panic!("{key:?} is not under {}", anonymous_store_key(key)));
        assert_eq!(completed(&stored).body, first.body);
    }
    assert_eq!(runs.runs.load(Ordering::SeqCst), keys.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_bare_and_whitespace_forms_name_the_same_key() {
    let h = harness(Via::Direct, "forms", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());

    // Each group names one key; groups are different keys.
    let groups: Vec<(&str, Vec<&[u8]>)> = vec![
        (
            "abc",
            vec![b"abc", b"\"abc\"", b"  abc", b"abc\t", b"\t \"abc\"  "],
        ),
        ("a\"b\\c", vec![br#""a\"b\\c""#, br#"a"b\c"#, b" a\"b\\c "]),
        (" abc", vec![b"\" abc\""]),
        ("abc ", vec![b"\"abc \""]),
        ("a b", vec![b"\"a b\""]),
        ("ABC", vec![b"ABC", b"\"ABC\""]),
        ("abC", vec![b"abC"]),
        ("abd", vec![b"abd"]),
        ("ab", vec![b"ab"]),
        ("abc\\", vec![br#""abc\\""#, br"abc\"]),
    ];
    let mut bodies = Vec::new();
    for (key, forms) in &groups {
        let before = runs.runs.load(Ordering::SeqCst);
        let first = send(&app, keyed(forms[0])).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{key:?}: {:?}",
            first.body
        );
        assert_eq!(
            runs.runs.load(Ordering::SeqCst),
            before + 1,
            "{key:?} ran anew"
        );
        let body = String::from_utf8(first.body.to_vec()).unwrap();
        assert!(
            body.contains(&format!(" key {key} body")),
            "{key:?}: {body}"
        );
        for form in &forms[1..] {
            let again = send(&app, keyed(form)).await;
            assert!(
                again.is_replay(),
                "{:?} should replay {key:?}: {:?}",
                String::from_utf8_lossy(form),
                again.body
            );
            assert_eq!(again.body, first.body);
        }
        assert!(h.peek(&anonymous_store_key(key)).await.is_some(), "{key:?}");
        bodies.push(first.body);
    }
    assert_eq!(runs.runs.load(Ordering::SeqCst), groups.len());
    let distinct: std::collections::HashSet<_> = bodies.iter().collect();
    assert_eq!(distinct.len(), groups.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lengths_255_accepted_256_refused() {
    let h = harness(Via::Direct, "lengths", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let accepted: Vec<(String, Vec<u8>)> = vec![
        ("a".repeat(255), "a".repeat(255).into_bytes()),
        (
            "b".repeat(255),
            format!("  {}\t", "b".repeat(255)).into_bytes(),
        ),
        (
            "\"".repeat(255),
            format!("\"{}\"", "\\\"".repeat(255)).into_bytes(),
        ),
        (
            " ".repeat(254) + "c",
            format!("\"{}c\"", " ".repeat(254)).into_bytes(),
        ),
    ];
    for (key, form) in &accepted {
        let before = runs.runs.load(Ordering::SeqCst);
        let first = send(&app, keyed(form)).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{} chars: {:?}",
            key.len(),
            first.body
        );
        assert_eq!(runs.runs.load(Ordering::SeqCst), before + 1);
        let again = send(&app, keyed(form)).await;
        assert!(again.is_replay());
        assert_eq!(again.body, first.body);
        assert!(h.peek(&anonymous_store_key(key)).await.is_some());
    }
    let before = runs.runs.load(Ordering::SeqCst);
    let refused: Vec<Vec<u8>> = vec![
        "a".repeat(256).into_bytes(),
        format!("\"{}\"", "\\\"".repeat(256)).into_bytes(),
        format!("\"{}\"", "x".repeat(256)).into_bytes(),
        "a".repeat(4096).into_bytes(),
    ];
    for form in &refused {
        let answer = send(&app, keyed(form)).await;
        answer.assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_INVALID);
        assert!(
            answer.json()["detail"].as_str().unwrap().contains("256") || form.len() > 1000,
            "{:?}",
            answer.json()
        );
    }
    assert_eq!(
        runs.runs.load(Ordering::SeqCst),
        before,
        "a refused key never runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_high_or_control_bytes_are_refused_in_process() {
    let h = harness(Via::Direct, "bytes", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let mut refused: Vec<Vec<u8>> = Vec::new();
    for byte in 0x80u8..=0xff {
        refused.push(vec![byte]);
        refused.push(vec![b'a', byte, b'b']);
        refused.push(vec![b'a', b'b', byte]);
        refused.push(vec![b'"', b'a', byte, b'"']);
    }
    refused.push("ké".as_bytes().to_vec());
    refused.push("日本".as_bytes().to_vec());
    refused.push(b"a\tb".to_vec());
    refused.push(b"a b".to_vec());
    refused.push(b"\"a\tb\"".to_vec());
    refused.push(b"\"".to_vec());
    refused.push(b"\"abc".to_vec());
    refused.push(b"\"a\\nb\"".to_vec());
    refused.push(b"\"abc\"x".to_vec());
    refused.push(b"".to_vec());
    refused.push(b"  \t ".to_vec());
    refused.push(b"\"   \"".to_vec());
    for form in &refused {
        let answer = send(&app, keyed(form)).await;
        answer.assert_problem(StatusCode::BAD_REQUEST, Problem::KEY_INVALID);
    }
    assert_eq!(runs.runs.load(Ordering::SeqCst), 0);
    assert_eq!(h.memory.as_ref().unwrap().claim_count(), 0);
    h.memory.as_ref().unwrap().run_pending_tasks();
    assert_eq!(h.memory.as_ref().unwrap().entry_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_high_or_control_bytes_over_a_socket_are_refused_and_never_panic() {
    let h = harness(Via::Direct, "bytes_socket", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let addr = serve(app).await;
    let mut forms: Vec<Vec<u8>> = Vec::new();
    for byte in (0x00u8..0x20).chain([0x7f]).chain(0x80..=0xff) {
        if byte == b'\r' || byte == b'\n' {
            continue;
        }
        forms.push(vec![b'a', byte, b'b']);
    }
    forms.push(b"\"a\x01b\"".to_vec());
    forms.push(b"\"a\xffb\"".to_vec());
    for form in &forms {
        let mut conn = Conn::open(addr).await;
        let answer = conn
            .exchange(
                &raw_request("POST", "/pay", Some(form), b"same body"),
                false,
            )
            .await;
        assert_eq!(
            answer.status,
            400,
            "{:?}: {:?}",
            String::from_utf8_lossy(form),
            String::from_utf8_lossy(&answer.body)
        );
    }
    assert_eq!(runs.runs.load(Ordering::SeqCst), 0);
    // The server still serves, and a valid key still runs once.
    let mut conn = Conn::open(addr).await;
    let ok = conn
        .exchange(
            &raw_request("POST", "/pay", Some(b"fine"), b"same body"),
            false,
        )
        .await;
    assert_eq!(ok.status, 201);
    let again = conn
        .exchange(
            &raw_request("POST", "/pay", Some(b"fine"), b"same body"),
            false,
        )
        .await;
    assert!(again.is_replay());
    assert_eq!(again.body, ok.body);
    assert_eq!(runs.runs.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// 4. The store key `scope-hex:key`, computed independently.
// ---------------------------------------------------------------------------------------

#[test]
fn scoped_key_is_lowercase_scope_hex_colon_key() {
    let keys = ["k", "order-42", "{x}:*?", "A:B:C", &"z".repeat(255)];
    for n in 0..2000u32 {
        let value = format!("value-{n}");
        let expected_scope = hex(&scope_bytes(1, value.as_bytes(), b""));
        let scope = Scope::of(&value);
        assert_eq!(scope.to_hex(), expected_scope, "{value}");
        assert_eq!(format!("{scope:?}"), format!("Scope({expected_scope})"));
        let key = keys[n as usize % keys.len()];
        let scoped = ScopedKey::new(scope, IdempotencyKey::parse(key.as_bytes()).unwrap());
        let expected = format!("{expected_scope}:{key}");
        assert_eq!(scoped.as_str(), expected, "{value}");
        assert_eq!(scoped.to_string(), expected);
        assert_eq!(scoped.as_str().len(), 33 + key.len());
        assert!(
            scoped.as_str()[..32]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        // The log digest: first 8 bytes of SHA-256(len(secret) BE, secret, scoped key).
        let secret = format!("secret-{n}");
        let hash = Sha256::new()
            .chain_update((secret.len() as u64).to_be_bytes())
            .chain_update(secret.as_bytes())
            .chain_update(expected.as_bytes())
            .finalize();
        assert_eq!(scoped.digest(secret.as_bytes()), hex(&hash[..8]));
    }
    // The brief's example, spelled out.
    let x = ScopedKey::new(Scope::of("x"), IdempotencyKey::parse(b"key-1").unwrap());
    assert_eq!(
        x.as_str(),
        format!("{}:key-1", hex(&scope_bytes(1, b"x", b"")))
    );
    // Anonymous, principal and host scopes.
    assert_eq!(Scope::anonymous().to_hex(), anonymous_hex());
    let principal = Principal::new("alice").scope();
    assert_eq!(principal.to_hex(), hex(&scope_bytes(4, b"alice", b"")));
    let on_host = Scope::of("x").on_host("API.Example");
    let inner = scope_bytes(1, b"x", b"");
    assert_eq!(
        on_host.to_hex(),
        hex(&scope_bytes(2, &inner, b"api.example"))
    );
}

/// A record planted under the independently computed `scope-hex:key` (as an older build
/// wrote it) is found and replayed by a request from that client, on that host; the handler
/// never runs. And what a request stores lands under that same name.
async fn planted_records_are_found_under_the_documented_key(via: Via) {
    let h = harness(via, "planted", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let body = b"same body";
    let fingerprint = Fingerprint::of(&FingerprintMode::Exact, &Method::POST, "/pay", body);
    let authorization = b"Bearer token-1";
    let scope = scope_bytes(2, &scope_bytes(3, authorization, b""), b"api.example");
    let key = "legacy-key";
    let store_key = format!("{}:{key}", hex(&scope));
    let record = Record::Completed(StoredResponse {
        fingerprint,
        status: StatusCode::ACCEPTED,
        headers: vec![
            (
                HeaderName::from_static("x-old"),
                HeaderValue::from_static("1"),
            ),
            (
                HeaderName::from_static("x-old"),
                HeaderValue::from_static("2"),
            ),
            (
                HeaderName::from_static("x-other"),
                HeaderValue::from_static("3"),
            ),
        ],
        body: Bytes::from_static(b"from an older build"),
        expires_at_ms: now_ms() + 600_000,
    })
    .encode();
    h.plant(&store_key, record).await;
    let request = |key: &str| {
        let mut request = post_with("/pay", Some(key), "same body");
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(authorization).unwrap(),
        );
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("API.Example:8443"));
        request
    };
    let answer = send(&app, request(key)).await;
    assert_eq!(
        runs.runs.load(Ordering::SeqCst),
        0,
        "{via:?}: found, not run"
    );
    assert_eq!(
        answer.status,
        StatusCode::ACCEPTED,
        "{via:?}: {:?}",
        answer.body
    );
    assert!(answer.is_replay());
    assert_eq!(answer.body, Bytes::from_static(b"from an older build"));
    assert_eq!(
        header_list(&answer.headers, &["idempotent-replayed", "content-length"]),
        vec![
            ("x-old".to_owned(), b"1".to_vec()),
            ("x-old".to_owned(), b"2".to_vec()),
            ("x-other".to_owned(), b"3".to_vec()),
        ]
    );
    // A new key from the same client is stored under the same scope part.
    let fresh = send(&app, request("fresh-key")).await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_eq!(runs.runs.load(Ordering::SeqCst), 1);
    let stored = h
        .peek(&format!("{}:fresh-key", hex(&scope)))
        .await
        .unwrap_or_else(|| panic!("{via:?}: not under the documented key"));
    assert_eq!(completed(&stored).body, fresh.body);
    if via == Via::Redis {
        let prefix = h.prefix.clone().unwrap();
        assert_eq!(
            h.redis_keys().await,
            vec![
                format!("{prefix}{}:fresh-key", hex(&scope)),
                format!("{prefix}{store_key}"),
            ]
        );
    }
    h.cleanup().await;
}

/// A record an older build stored under `HeaderPolicy::all()`, with the handler's
/// `transfer-encoding: chunked` in it, is replayed whole: the body goes out with its
/// length, and no `transfer-encoding` contradicts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_transfer_encoding_is_not_replayed() {
    let h = harness(Via::Direct, "planted_te", |b| {
        b.replay_headers(HeaderPolicy::all())
    })
    .await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    let body = b"same body";
    let fingerprint = Fingerprint::of(&FingerprintMode::Exact, &Method::POST, "/pay", body);
    let authorization = b"Bearer token-te";
    let scope = scope_bytes(2, &scope_bytes(3, authorization, b""), b"api.example");
    let store_key = format!("{}:te-key", hex(&scope));
    let record = Record::Completed(StoredResponse {
        fingerprint,
        status: StatusCode::CREATED,
        headers: vec![
            (
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("1"),
            ),
            (
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            ),
            (
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("2"),
            ),
        ],
        body: Bytes::from_static(b"stored with its framing"),
        expires_at_ms: now_ms() + 600_000,
    })
    .encode();
    h.plant(&store_key, record).await;
    let mut request = post_with("/pay", Some("te-key"), "same body");
    request.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_bytes(authorization).unwrap(),
    );
    request
        .headers_mut()
        .insert(header::HOST, HeaderValue::from_static("API.Example:8443"));
    let answer = send(&app, request).await;
    assert_eq!(runs.runs.load(Ordering::SeqCst), 0, "found, not run");
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
    assert!(answer.is_replay());
    assert_eq!(answer.body, Bytes::from_static(b"stored with its framing"));
    assert!(
        !answer.headers.contains_key(header::TRANSFER_ENCODING),
        "{:?}",
        answer.headers
    );
    assert_eq!(
        header_list(&answer.headers, &["idempotent-replayed", "content-length"]),
        vec![
            ("x-a".to_owned(), b"1".to_vec()),
            ("x-b".to_owned(), b"2".to_vec()),
        ]
    );
    h.cleanup().await;
}

on_every_store!(
    planted_records_are_found_under_the_documented_key =>
    planted_records_are_found_under_the_documented_key_direct,
    planted_records_are_found_under_the_documented_key_shared,
    planted_records_are_found_under_the_documented_key_redis
);

// ---------------------------------------------------------------------------------------
// 5. One key, two clients.
// ---------------------------------------------------------------------------------------

async fn authenticate(mut request: Request, next: Next) -> Response {
    if let Some(user) = request.headers().get("x-user").cloned() {
        request
            .extensions_mut()
            .insert(Principal::new(user.as_bytes()));
    }
    next.run(request).await
}

async fn same_key_two_clients(via: Via) {
    let h = harness(via, "two_clients", |b| b.shared_scope(false)).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone()).layer(middleware::from_fn(authenticate));
    let by_token = |token: &str| {
        let mut request = post_with("/pay", Some("shared-key"), "same body");
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        request
    };
    let by_user = |user: &str| {
        let mut request = post_with("/pay", Some("shared-key"), "same body");
        request
            .headers_mut()
            .insert("x-user", HeaderValue::from_str(user).unwrap());
        request
    };
    // Concurrently: four clients, one key.
    let barrier = Arc::new(Barrier::new(4));
    let mut tasks = Vec::new();
    for request in [
        by_token("a"),
        by_token("A"),
        by_user("alice"),
        by_user("bob"),
    ] {
        let (app, barrier) = (app.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            send(&app, request).await
        }));
    }
    let mut firsts = Vec::new();
    for task in tasks {
        firsts.push(task.await.unwrap());
    }
    assert_eq!(
        runs.runs.load(Ordering::SeqCst),
        4,
        "{via:?}: one run per client"
    );
    let mut run_numbers = Vec::new();
    for answer in &firsts {
        assert_eq!(
            answer.status,
            StatusCode::CREATED,
            "{via:?}: {:?}",
            answer.body
        );
        assert!(!answer.is_replay());
        run_numbers.push(answer.headers["x-run"].to_str().unwrap().to_owned());
    }
    run_numbers.sort();
    run_numbers.dedup();
    assert_eq!(run_numbers.len(), 4);
    // Each client's retry gets its own answer.
    let retries = [
        by_token("a"),
        by_token("A"),
        by_user("alice"),
        by_user("bob"),
    ];
    for (first, retry) in firsts.iter().zip(retries) {
        let again = send(&app, retry).await;
        assert!(again.is_replay(), "{via:?}");
        assert_eq!(again.body, first.body, "{via:?}: another client's response");
        assert_eq!(again.headers["x-run"], first.headers["x-run"]);
    }
    // No identity: refused, not the shared answer.
    let anonymous = send(&app, post_with("/pay", Some("shared-key"), "same body")).await;
    anonymous.assert_problem(StatusCode::BAD_REQUEST, Problem::SCOPE_MISSING);
    assert_eq!(runs.runs.load(Ordering::SeqCst), 4);
    // The store holds four records named by four scopes, one key.
    let scopes = [
        scope_bytes(3, b"Bearer a", b""),
        scope_bytes(3, b"Bearer A", b""),
        scope_bytes(4, b"alice", b""),
        scope_bytes(4, b"bob", b""),
    ];
    for (first, scope) in firsts.iter().zip(scopes) {
        let stored = h
            .peek(&format!("{}:shared-key", hex(&scope)))
            .await
            .unwrap_or_else(|| panic!("{via:?}: a client's record is missing"));
        assert_eq!(completed(&stored).body, first.body);
    }
    h.cleanup().await;
}

on_every_store!(
    same_key_two_clients =>
    same_key_two_clients_direct,
    same_key_two_clients_shared,
    same_key_two_clients_redis
);

// ---------------------------------------------------------------------------------------
// 6. begin / complete / release on each path, under 48 concurrent callers of one key.
// ---------------------------------------------------------------------------------------

struct Held {
    runs: AtomicUsize,
    gate: Semaphore,
    /// Runs up to this number answer 503 (released, not stored).
    fail_until: usize,
}

async fn held(idem: Idempotent, State(held): State<Arc<Held>>, body: Bytes) -> Response {
    idem.run(async move {
        let n = held.runs.fetch_add(1, Ordering::SeqCst) + 1;
        held.gate.acquire().await.unwrap().forget();
        let status = if n <= held.fail_until {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::CREATED
        };
        let mut response = Response::new(Body::from(format!(
            "run {n}: {}",
            String::from_utf8_lossy(&body)
        )));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert("x-run", HeaderValue::from(n));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        response
    })
    .await
}

const CALLERS: usize = 48;

/// `CALLERS` requests of one key at once, the handler held: all but one answer 409
/// in flight while it is held; the last is the handler's own answer.
async fn wave(app: &Router, held: &Held, key: &str) -> (Vec<Answer>, Answer) {
    let barrier = Arc::new(Barrier::new(CALLERS));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..CALLERS {
        let (app, barrier, tx) = (app.clone(), barrier.clone(), tx.clone());
        let key = key.to_owned();
        tokio::spawn(async move {
            barrier.wait().await;
            let answer = send(&app, post_with("/held", Some(&key), "payload")).await;
            let _ = tx.send(answer);
        });
    }
    let mut early = Vec::new();
    for n in 0..CALLERS - 1 {
        let answer = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {n} callers answered while the handler was held (runs: {})",
                    held.runs.load(Ordering::SeqCst)
                )
            })
            .unwrap();
        early.push(answer);
    }
    // Enough permits that a second execution (a bug) could not hang the test.
    held.gate.add_permits(CALLERS);
    let last = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the held handler's answer")
        .unwrap();
    // Close the gate again for the next wave.
    held.gate.forget_permits(CALLERS);
    (early, last)
}

async fn replays_all(app: &Router, key: &str, expected: &Answer) {
    let barrier = Arc::new(Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let (app, barrier) = (app.clone(), barrier.clone());
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            send(&app, post_with("/held", Some(&key), "payload")).await
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, expected.status);
        assert!(answer.is_replay());
        assert_eq!(answer.body, expected.body);
        let skip = ["idempotent-replayed"];
        assert_eq!(
            header_list(&answer.headers, &skip),
            header_list(&expected.headers, &skip)
        );
    }
}

async fn one_key_many_callers(via: Via, fail_first: bool) {
    let h = harness(via, "one_key", |b| b).await;
    let held = Arc::new(Held {
        runs: AtomicUsize::new(0),
        gate: Semaphore::new(0),
        fail_until: usize::from(fail_first),
    });
    let app = Router::new()
        .route("/held", post(held_handler))
        .with_state(held.clone())
        .layer(h.idem.layer());
    let key = "one-key";
    let store_key = anonymous_store_key(key);

    let (early, last) = wave(&app, &held, key).await;
    for answer in &early {
        answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
        assert!(answer.headers.contains_key(header::RETRY_AFTER));
    }
    assert_eq!(
        held.runs.load(Ordering::SeqCst),
        1,
        "{via:?}: one execution"
    );
    let winner = if fail_first {
        // Released: nothing under the key, no claim left.
        assert_eq!(last.status, StatusCode::SERVICE_UNAVAILABLE, "{via:?}");
        assert_eq!(last.body, Bytes::from_static(b"run 1: payload"));
        if let Some(memory) = &h.memory {
            assert_eq!(memory.claim_count(), 0, "{via:?}: the claim was released");
        }
        assert!(h.peek(&store_key).await.is_none(), "{via:?}: released");
        let (early, last) = wave(&app, &held, key).await;
        for answer in &early {
            answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
        }
        assert_eq!(
            held.runs.load(Ordering::SeqCst),
            2,
            "{via:?}: ran once more"
        );
        assert_eq!(last.body, Bytes::from_static(b"run 2: payload"));
        last
    } else {
        assert_eq!(last.body, Bytes::from_static(b"run 1: payload"));
        last
    };
    assert_eq!(winner.status, StatusCode::CREATED, "{via:?}");
    assert!(!winner.is_replay());
    let runs = held.runs.load(Ordering::SeqCst);
    replays_all(&app, key, &winner).await;
    assert_eq!(
        held.runs.load(Ordering::SeqCst),
        runs,
        "{via:?}: replays never run"
    );

    // What the store holds: the winner's response, under the documented name.
    let stored = completed(&h.peek(&store_key).await.expect("the record"));
    assert_eq!(stored.status, StatusCode::CREATED);
    assert_eq!(stored.body, winner.body);
    let expected_run = HeaderValue::from(runs);
    assert_eq!(
        stored.headers,
        vec![
            (HeaderName::from_static("x-run"), expected_run),
            (
                HeaderName::from_static("x-multi"),
                HeaderValue::from_static("a")
            ),
            (
                HeaderName::from_static("x-multi"),
                HeaderValue::from_static("b")
            ),
        ]
    );
    assert_eq!(
        stored.fingerprint,
        Fingerprint::of(&FingerprintMode::Exact, &Method::POST, "/held", b"payload")
    );
    if let Some(memory) = &h.memory {
        assert_eq!(memory.claim_count(), 0);
        memory.run_pending_tasks();
        assert_eq!(memory.entry_count(), 1);
    } else {
        let prefix = h.prefix.clone().unwrap();
        assert_eq!(h.redis_keys().await, vec![format!("{prefix}{store_key}")]);
    }
    h.cleanup().await;
}

async fn held_handler(idem: Idempotent, state: State<Arc<Held>>, body: Bytes) -> Response {
    held(idem, state, body).await
}

on_every_store!(
    |via| one_key_many_callers(via, false) =>
    one_key_many_callers_complete_direct,
    one_key_many_callers_complete_shared,
    one_key_many_callers_complete_redis
);

on_every_store!(
    |via| one_key_many_callers(via, true) =>
    one_key_many_callers_release_then_complete_direct,
    one_key_many_callers_release_then_complete_shared,
    one_key_many_callers_release_then_complete_redis
);

/// No gate: 64 callers of one key let loose at once, the handler free to finish while
/// they arrive. Exactly one run; every answer is that response (first or replayed) or a
/// 409 in flight.
async fn free_for_all(via: Via) {
    let h = harness(via, "free_for_all", |b| b).await;
    let runs = Arc::new(Runs::default());
    let app = counted_app(&h.idem, runs.clone());
    for round in 0..4 {
        let key = format!("free-{round}");
        let barrier = Arc::new(Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (app, barrier, key) = (app.clone(), barrier.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                send(&app, keyed(key.as_bytes())).await
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert_eq!(
            runs.runs.load(Ordering::SeqCst),
            round + 1,
            "{via:?} round {round}: one execution per key"
        );
        let originals: Vec<_> = answers
            .iter()
            .filter(|a| a.status == StatusCode::CREATED && !a.is_replay())
            .collect();
        assert_eq!(originals.len(), 1, "{via:?}: one original answer");
        let original = originals[0].clone();
        for answer in &answers {
            match answer.status {
                StatusCode::CREATED => {
                    assert_eq!(answer.body, original.body);
                    assert_eq!(answer.headers["x-run"], original.headers["x-run"]);
                }
                StatusCode::CONFLICT => {
                    answer.assert_problem(StatusCode::CONFLICT, Problem::IN_FLIGHT);
                }
                other => panic!("{via:?}: unexpected {other}: {:?}", answer.body),
            }
        }
        let stored = completed(&h.peek(&anonymous_store_key(&key)).await.unwrap());
        assert_eq!(stored.body, original.body);
    }
    h.cleanup().await;
}

on_every_store!(
    free_for_all =>
    free_for_all_direct,
    free_for_all_shared,
    free_for_all_redis
);

/// The same requests on the direct path and on the `dyn Store` path store the same
/// records, byte for byte apart from the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_store_paths_store_the_same_records() {
    let mut records = Vec::new();
    for via in [Via::Direct, Via::Shared, Via::Redis] {
        let h = harness(via, "same_records", |b| b).await;
        let scripts = Arc::new(Scripts::default());
        let app = scripted_app(&h.idem, scripts.clone());
        let spec = numbered(13, 3)
            .header("x-h-000", "again")
            .header("set-cookie", "no")
            .body("same");
        scripts.set("same", spec);
        let (first, replay) = in_process_pair(&app, "same").await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(replay.is_replay());
        let stored = completed(&h.peek(&anonymous_store_key("key-same")).await.unwrap());
        records.push((
            via,
            stored.status,
            stored.headers,
            stored.body,
            stored.fingerprint,
        ));
        h.cleanup().await;
    }
    let (_, status, headers, body, fingerprint) = &records[0];
    for (via, s, hd, b, f) in &records[1..] {
        assert_eq!(s, status, "{via:?}");
        assert_eq!(hd, headers, "{via:?}");
        assert_eq!(b, body, "{via:?}");
        assert_eq!(f, fingerprint, "{via:?}");
    }
}
