//! How four actors' parts of one request run: as tasks of a two-worker runtime, or each on a
//! thread of its own (what `ShardHandle::spawn` does for a ShardOwner).
//!
//! `cargo run --release -p freshet-actors --example owner_wake -- [WORK_US] [ROUNDS]`
//!
//! A caller outside the runtime (as `freshet train`'s main thread is) sends four actors a part
//! each, WORK_US of spinning (default 250), waits for all four answers, then stays away 5 ms,
//! as a training step's dense math does. Prints, for both layouts, the median wall time of a
//! round and when each part started after the send. Two cores that overlap perfectly would
//! take 2 × WORK_US.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

type Part = (Duration, oneshot::Sender<Duration>);

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// One actor: answers each part with the time it started, measured from `epoch`.
async fn actor(mut rx: mpsc::UnboundedReceiver<Part>, epoch: Instant) {
    while let Some((work, reply)) = rx.recv().await {
        let start = epoch.elapsed();
        spin(work);
        let _ = reply.send(start);
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let work = Duration::from_micros(args.next().map_or(Ok(250), |s| s.parse())?);
    let rounds: usize = args.next().map_or(Ok(300), |s| s.parse())?;
    anyhow::ensure!(rounds > 0, "ROUNDS must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for own_threads in [false, true] {
        let epoch = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = mpsc::unbounded_channel::<Part>();
            if own_threads {
                std::thread::spawn(move || {
                    let one = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a current-thread runtime");
                    one.block_on(actor(rx, epoch));
                });
            } else {
                rt.spawn(actor(rx, epoch));
            }
            senders.push(tx);
        }
        let mut walls: Vec<(Duration, Vec<Duration>)> = rt.block_on(async {
            let mut walls = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(5));
                let sent = epoch.elapsed();
                let mut answers = Vec::new();
                for tx in &senders {
                    let (reply, answer) = oneshot::channel();
                    tx.send((work, reply))?;
                    answers.push(answer);
                }
                let mut starts = Vec::new();
                for a in answers {
                    starts.push(a.await? - sent);
                }
                walls.push((epoch.elapsed() - sent, starts));
            }
            anyhow::Ok(walls)
        })?;
        walls.sort_by_key(|w| w.0);
        let (wall, starts) = &walls[walls.len() / 2];
        println!(
            "{}: median round {:.3} ms for 4 x {} us; its parts started at {:?}",
            if own_threads {
                "a thread per actor"
            } else {
                "tasks on 2 runtime workers"
            },
            wall.as_secs_f64() * 1e3,
            work.as_micros(),
            starts
                .iter()
                .map(|s| format!("{:.0} us", s.as_secs_f64() * 1e6))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}
