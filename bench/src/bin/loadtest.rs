//! Load test: serves every row of the benchmark on loopback, drives each with `wrk`
//! for a fixed time, and prints requests/s, p50, p99 and the ratio of each row to its
//! floor. Starts and stops its own `redis-server`. Bounded: rows × seconds.
//!
//! Rows run in interleaved rounds (every row once per round); the table gives medians
//! over the rounds, each ratio being the median of per-round ratios, so a noisy machine
//! moves a row and its floor together.
//!
//! `cargo run --release -p idem-bench --bin loadtest -- [seconds per run] [connections] [rounds]`

use std::io::Write;

use idem_bench::wrk::{self, Keys, Measured, Script, median};
use testkit::RedisServer;

struct Row {
    name: &'static str,
    path: &'static str,
    keys: Keys,
    floor: Option<&'static str>,
    target: Option<f64>,
}

const ROWS: &[Row] = &[
    Row {
        name: "1 bare handler",
        path: "/bare",
        keys: Keys::None,
        floor: None,
        target: None,
    },
    Row {
        name: "2 bare + 1 Redis GET",
        path: "/floor/one",
        keys: Keys::None,
        floor: None,
        target: None,
    },
    Row {
        name: "3 bare + 2 Redis cmds",
        path: "/floor/two",
        keys: Keys::None,
        floor: None,
        target: None,
    },
    Row {
        name: "4 memory miss",
        path: "/memory",
        keys: Keys::Fresh,
        floor: Some("1 bare handler"),
        target: Some(0.80),
    },
    Row {
        name: "4 memory hit",
        path: "/memory",
        keys: Keys::Same,
        floor: Some("1 bare handler"),
        target: Some(0.80),
    },
    Row {
        name: "5 redis miss",
        path: "/redis",
        keys: Keys::Fresh,
        floor: Some("3 bare + 2 Redis cmds"),
        target: Some(0.85),
    },
    Row {
        name: "5 redis hit",
        path: "/redis",
        keys: Keys::Same,
        floor: Some("2 bare + 1 Redis GET"),
        target: Some(0.90),
    },
    Row {
        name: "6 local-tier hit",
        path: "/local",
        keys: Keys::Same,
        floor: Some("1 bare handler"),
        target: Some(0.90),
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    let connections: u64 = args.next().map_or(Ok(32), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    wrk::check_installed()?;
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let app = runtime.block_on(idem_bench::app(&redis.url()))?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = listener.local_addr()?;
    runtime.spawn(async move { axum::serve(listener, app).await });

    let script = Script::write()?;
    println!(
        "wrk: 1 thread, {connections} connections, {seconds} s per run, {rounds} interleaved rounds; server: 2 tokio workers; private redis-server"
    );
    // IDEM_ROWS="redis miss,memory" keeps only rows whose name contains one of the parts.
    let only = std::env::var("IDEM_ROWS").unwrap_or_default();
    let selected =
        |row: &Row| only.is_empty() || only.split(',').any(|part| row.name.contains(part.trim()));
    let rows: Vec<(usize, &Row)> = ROWS
        .iter()
        .enumerate()
        .filter(|(_, row)| selected(row))
        .collect();
    let mut runs: Vec<Vec<Measured>> = rows.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (slot, (index, row)) in rows.iter().enumerate() {
            let url = format!("http://{address}{}", row.path);
            let prefix = format!("run{}-row{index}-round{round}", std::process::id());
            runs[slot].push(wrk::run(
                &url,
                &script,
                row.keys,
                &prefix,
                seconds,
                connections,
            )?);
            print!(".");
            std::io::stdout().flush()?;
        }
    }
    println!();
    let slot_of = |name: &str| rows.iter().position(|(_, r)| r.name == name);
    println!("| row | requests/s | p50 ms | p99 ms | floor | ratio | target |");
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: |");
    for (slot, (_, row)) in rows.iter().enumerate() {
        let mine = &runs[slot];
        let ratio = row.floor.and_then(slot_of).map(|floor| {
            median(
                mine.iter()
                    .zip(&runs[floor])
                    .map(|(m, f)| m.rps / f.rps)
                    .collect(),
            )
        });
        println!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} | {} |",
            row.name,
            median(mine.iter().map(|m| m.rps).collect()),
            median(mine.iter().map(|m| m.p50_ms).collect()),
            median(mine.iter().map(|m| m.p99_ms).collect()),
            row.floor.unwrap_or("-"),
            ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
            row.target.map_or("-".to_owned(), |t| format!("≥ {t:.2}")),
        );
    }
    if let (Some(miss), Some(floor)) = (slot_of("5 redis miss"), slot_of("3 bare + 2 Redis cmds")) {
        let p99_ratio = median(
            runs[miss]
                .iter()
                .zip(&runs[floor])
                .map(|(m, f)| m.p99_ms / f.p99_ms)
                .collect(),
        );
        println!(
            "\np99 of the Redis miss path / p99 of row 3 (median of rounds): {p99_ratio:.2} (target ≤ 1.50)"
        );
    }
    Ok(())
}
