//! What the metrics cost: the benchmark app served twice, by two processes alike but
//! for one thing, a Prometheus recorder installed in one of them (as the example app
//! installs it), driven by `wrk` in interleaved rounds. Prints, per path, the median
//! requests/s of each and the median of the per-round ratios with / without.
//!
//! `cargo run --release -p idem-bench --bin metrics_cost -- [seconds per run] [connections] [rounds] [paths]`

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use idem_bench::wrk::{self, Keys, Measured, Script, median};
use testkit::RedisServer;

/// Set in a child's environment: serve the app on the Redis at this URL.
const SERVE: &str = "IDEM_METRICS_COST_SERVE";
/// Set to `1` in a child's environment: install the Prometheus recorder first.
const RECORDER: &str = "IDEM_METRICS_COST_RECORDER";

const PATHS: &[(&str, &str, Keys)] = &[
    ("memory miss", "/memory", Keys::Fresh),
    ("memory hit", "/memory", Keys::Same),
    ("redis miss", "/redis", Keys::Fresh),
    ("redis hit", "/redis", Keys::Same),
    ("local-tier hit", "/local", Keys::Same),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(redis_url) = std::env::var(SERVE) {
        return serve(&redis_url, std::env::var(RECORDER).as_deref() == Ok("1"));
    }
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let connections: u64 = args.next().map_or(Ok(32), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    // A fourth argument, "redis hit,memory", keeps the paths whose name contains a part.
    let only = args.next().unwrap_or_default();
    let paths: Vec<_> = PATHS
        .iter()
        .filter(|(name, _, _)| {
            only.is_empty() || only.split(',').any(|part| name.contains(part.trim()))
        })
        .collect();
    wrk::check_installed()?;
    let redis = RedisServer::start();
    let without = Server::start(&redis.url(), false)?;
    let with = Server::start(&redis.url(), true)?;
    let script = Script::write()?;
    println!(
        "wrk: 1 thread, {connections} connections, {seconds} s per run, {rounds} interleaved rounds; two servers of 2 tokio workers each, one with the Prometheus recorder; private redis-server"
    );
    // runs[path] = (without, with), one entry per round.
    let mut runs: Vec<(Vec<Measured>, Vec<Measured>)> =
        paths.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 0..rounds {
        for (index, (_, path, keys)) in paths.iter().enumerate() {
            // Alternate which server goes first, so neither always runs on a warmer machine.
            let order = if round % 2 == 0 {
                [(&without, false), (&with, true)]
            } else {
                [(&with, true), (&without, false)]
            };
            for (server, recorded) in order {
                let prefix = format!("mc{}-{index}-{round}-{recorded}", std::process::id());
                let url = format!("http://{}{path}", server.address);
                let measured = wrk::run(&url, &script, *keys, &prefix, seconds, connections)?;
                let slot = &mut runs[index];
                if recorded { &mut slot.1 } else { &mut slot.0 }.push(measured);
                print!(".");
                std::io::stdout().flush()?;
            }
        }
    }
    println!();
    println!(
        "| path | requests/s without | requests/s with recorder | with / without | p99 ms without | p99 ms with |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for ((name, _, _), (without, with)) in paths.iter().zip(&runs) {
        let ratio = median(
            with.iter()
                .zip(without)
                .map(|(w, o)| w.rps / o.rps)
                .collect(),
        );
        println!(
            "| {name} | {:.0} | {:.0} | {ratio:.3} | {:.3} | {:.3} |",
            median(without.iter().map(|m| m.rps).collect()),
            median(with.iter().map(|m| m.rps).collect()),
            median(without.iter().map(|m| m.p99_ms).collect()),
            median(with.iter().map(|m| m.p99_ms).collect()),
        );
    }
    Ok(())
}

/// A child process serving the benchmark app; killed when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(redis_url: &str, recorder: bool) -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(SERVE, redis_url)
            .env(RECORDER, if recorder { "1" } else { "0" })
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout from the server")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let address = line.trim().to_owned();
        if address.is_empty() {
            let _ = child.kill();
            return Err("the server printed no address".into());
        }
        Ok(Self { child, address })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child: serves the app, printing its address first.
fn serve(redis_url: &str, recorder: bool) -> Result<(), Box<dyn std::error::Error>> {
    // Kept for the life of the process, as an application keeps it to render `/metrics`.
    if recorder {
        // As the example app sets it up: buckets for the store latencies, and the samples
        // folded into them every 5 s.
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("idem_store_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )?
            .install_recorder()?;
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                handle.run_upkeep();
            }
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = idem_bench::app(redis_url).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}
