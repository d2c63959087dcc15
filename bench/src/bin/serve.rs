//! Serves every row of the load test, on loopback beside a private `redis-server`, until
//! its standard input closes or it is told to stop (`SIGTERM`, `SIGINT`): for profiling
//! one row at a time (`perf stat`, `perf record`, Redis' `INFO commandstats`) under a
//! `wrk` started by hand. Its `redis-server` stops with it either way.
//!
//! Prints one line once the server listens: `http://ADDRESS redis=URL`.
//!
//! `sleep infinity | cargo run --release -p idem-bench --bin serve`

use std::io::Read;

use tokio::signal::unix::{SignalKind, signal};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let served = idem_bench::Served::start()?;
    println!("http://{} redis={}", served.address, served.redis.url());
    let (closed, stdin_closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
        let _ = closed.send(());
    });
    // A runtime of its own for the signals: the served one is busy serving.
    let waiting = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let why = waiting.block_on(async {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok::<_, std::io::Error>(tokio::select! {
            _ = stdin_closed => "standard input closed",
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        })
    })?;
    eprintln!("serve: stopping ({why})");
    // `served` is dropped here: the server stops, then its redis-server.
    drop(served);
    Ok(())
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
