//! Load test: serves every row of the benchmark on loopback, drives each with `wrk`
//! for a fixed time, and prints requests/s, p50, p99 and the ratio of each row to its
//! floor. Starts and stops its own `redis-server`. Bounded: rows × seconds.
//!
//! Rows run in interleaved rounds (every row once per round); the table gives medians
//! over the rounds, each ratio being the median of per-round ratios, so a noisy machine
//! moves a row and its floor together.
//!
//! `cargo run --release -p idem-bench --bin loadtest -- [seconds per run] [connections] [rounds]`
//! (`--features mimalloc`: the server on mimalloc rather than the system's allocator)

use std::io::Write;

use idem_bench::Served;
use idem_bench::wrk::{self, Keys, Measured, Script, median};

struct Row {
    name: &'static str,
    path: &'static str,
    keys: Keys,
    /// The row whose requests/s this row is compared with.
    floor: Option<&'static str>,
    target: Option<f64>,
    /// The row whose p99 this row's p99 is compared with (target ≤ 1.5 ×): the floor,
    /// except for the local tier's miss, whose throughput is compared with the same path
    /// without the tier.
    tail_floor: Option<&'static str>,
}

const ROWS: &[Row] = &[
    Row {
        name: "1 bare handler",
        path: "/bare",
        keys: Keys::None,
        floor: None,
        target: None,
        tail_floor: None,
    },
    Row {
        name: "1k bare handler, keyed requests",
        path: "/bare",
        keys: Keys::Fresh,
        floor: Some("1 bare handler"),
        target: None,
        tail_floor: None,
    },
    Row {
        name: "2 bare + 1 Redis GET",
        path: "/floor/one",
        keys: Keys::None,
        floor: None,
        target: None,
        tail_floor: None,
    },
    Row {
        name: "3 bare + 2 Redis cmds",
        path: "/floor/two",
        keys: Keys::None,
        floor: None,
        target: None,
        tail_floor: None,
    },
    Row {
        name: "3b bare + SET NX GET + script",
        path: "/floor/script",
        keys: Keys::None,
        floor: Some("3 bare + 2 Redis cmds"),
        target: None,
        tail_floor: None,
    },
    Row {
        name: "4 memory miss",
        path: "/memory",
        keys: Keys::Fresh,
        floor: Some("1 bare handler"),
        target: Some(0.80),
        tail_floor: Some("1 bare handler"),
    },
    Row {
        name: "4 memory hit",
        path: "/memory",
        keys: Keys::Same,
        floor: Some("1 bare handler"),
        target: Some(0.80),
        tail_floor: Some("1 bare handler"),
    },
    Row {
        name: "5 redis miss",
        path: "/redis",
        keys: Keys::Fresh,
        floor: Some("3 bare + 2 Redis cmds"),
        target: Some(0.85),
        tail_floor: Some("3 bare + 2 Redis cmds"),
    },
    Row {
        name: "5 redis hit",
        path: "/redis",
        keys: Keys::Same,
        floor: Some("2 bare + 1 Redis GET"),
        target: Some(0.95),
        tail_floor: Some("2 bare + 1 Redis GET"),
    },
    Row {
        name: "6 local-tier miss",
        path: "/local",
        keys: Keys::Fresh,
        floor: Some("5 redis miss"),
        target: Some(0.95),
        tail_floor: Some("3 bare + 2 Redis cmds"),
    },
    Row {
        name: "6 local-tier hit",
        path: "/local",
        keys: Keys::Same,
        floor: Some("1 bare handler"),
        target: Some(0.90),
        tail_floor: Some("1 bare handler"),
    },
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    let connections: u64 = args.next().map_or(Ok(32), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |s| s.parse())?;
    wrk::check_installed()?;
    let served = Served::start()?;
    let address = served.address;

    let script = Script::write()?;
    println!(
        "wrk: 1 thread, {connections} connections, {seconds} s per run, {rounds} interleaved rounds; server: 2 tokio workers, {allocator}; private redis-server",
        allocator = if cfg!(feature = "mimalloc") {
            "mimalloc"
        } else {
            "the system's allocator"
        }
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
    // The median of this row's per-round ratios to another row's figure.
    let ratio_to = |slot: usize, other: Option<&str>, figure: fn(&Measured) -> f64| {
        other.and_then(slot_of).map(|other| {
            median(
                runs[slot]
                    .iter()
                    .zip(&runs[other])
                    .map(|(m, f)| figure(m) / figure(f))
                    .collect(),
            )
        })
    };
    let shown = |value: Option<f64>| value.map_or("-".to_owned(), |r| format!("{r:.2}"));
    println!(
        "| row | requests/s | p50 ms | p99 ms | floor | ratio | target | p99 / floor p99 (≤ 1.50) |"
    );
    println!("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |");
    for (slot, (_, row)) in rows.iter().enumerate() {
        let mine = &runs[slot];
        println!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {} |",
            row.name,
            median(mine.iter().map(|m| m.rps).collect()),
            median(mine.iter().map(|m| m.p50_ms).collect()),
            median(mine.iter().map(|m| m.p99_ms).collect()),
            row.floor.unwrap_or("-"),
            shown(ratio_to(slot, row.floor, |m| m.rps)),
            row.target.map_or("-".to_owned(), |t| format!("≥ {t:.2}")),
            shown(ratio_to(slot, row.tail_floor, |m| m.p99_ms)),
        );
    }
    // The Redis miss beside the floor whose completion is the same script.
    if let (Some(miss), Some(_)) = (
        slot_of("5 redis miss"),
        slot_of("3b bare + SET NX GET + script"),
    ) {
        println!(
            "\n5 redis miss / 3b bare + SET NX GET + script: {}",
            shown(ratio_to(miss, Some("3b bare + SET NX GET + script"), |m| m.rps))
        );
    }
    Ok(())
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
