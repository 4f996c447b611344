use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::*;

/// A child that panics on `true` and counts its starts.
#[derive(Debug, Default)]
struct Worker;

impl Actor for Worker {
    type Msg = bool;
    type State = ();
    type Arguments = Arc<AtomicU64>;

    async fn pre_start(
        &self,
        _myself: ActorRef<bool>,
        starts: Arc<AtomicU64>,
    ) -> Result<(), ActorProcessingErr> {
        starts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<bool>,
        boom: bool,
        _st: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        assert!(!boom, "worker told to fail");
        Ok(())
    }
}

/// Children whose current refs and start counts the test can see.
struct Kids {
    refs: Vec<Arc<std::sync::Mutex<Option<ActorRef<bool>>>>>,
    starts: Vec<Arc<AtomicU64>>,
}

fn kids(strategies: &[Strategy]) -> (Kids, Vec<ChildSpec>) {
    let mut k = Kids {
        refs: Vec::new(),
        starts: Vec::new(),
    };
    let mut specs = Vec::new();
    for (i, &strategy) in strategies.iter().enumerate() {
        let slot = Arc::new(std::sync::Mutex::new(None));
        let starts = Arc::new(AtomicU64::new(0));
        k.refs.push(slot.clone());
        k.starts.push(starts.clone());
        let start: StartFn = Arc::new(move |sup: ActorCell| {
            let (slot, starts) = (slot.clone(), starts.clone());
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(None, Worker, starts, sup).await?;
                *slot.lock().unwrap() = Some(r.clone());
                Ok(r.get_cell())
            })
        });
        specs.push(ChildSpec {
            name: format!("w{i}"),
            strategy,
            start,
        });
    }
    (k, specs)
}

fn fast() -> Intensity {
    Intensity {
        max_restarts: 5,
        within: Duration::from_secs(60),
        backoff_min: Duration::from_millis(1),
        backoff_max: Duration::from_millis(10),
    }
}

impl Kids {
    fn boom(&self, i: usize) {
        let r = self.refs[i].lock().unwrap().clone().unwrap();
        r.cast(true).unwrap();
    }

    fn starts(&self) -> Vec<u64> {
        self.starts
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .collect()
    }

    /// Waits until the start counts reach `want`, through the supervisor's own status.
    async fn wait_for(&self, sup: &SupervisorHandle, want: &[u64]) {
        for _ in 0..2000 {
            let all_running = sup.status().await.unwrap().iter().all(|c| c.running);
            if all_running && self.starts() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("starts {:?}, wanted {want:?}", self.starts());
    }
}

#[tokio::test]
async fn one_for_one_restarts_only_the_failed_child() {
    let (k, specs) = kids(&[Strategy::OneForOne; 3]);
    let (sup, _j) = SupervisorHandle::spawn(SupervisorArgs {
        name: "t".into(),
        children: specs,
        intensity: fast(),
        gave_up: Default::default(),
    })
    .await
    .unwrap();
    k.wait_for(&sup, &[1, 1, 1]).await;
    k.boom(1);
    k.wait_for(&sup, &[1, 2, 1]).await;
    let st = sup.status().await.unwrap();
    assert_eq!(st[1].restarts, 1);
    assert!(st[1]
        .last_failure
        .as_deref()
        .unwrap()
        .contains("worker told to fail"));
    sup.shutdown().await;
}

#[tokio::test]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let (k, specs) = kids(&[Strategy::RestForOne; 4]);
    let (sup, _j) = SupervisorHandle::spawn(SupervisorArgs {
        name: "t".into(),
        children: specs,
        intensity: fast(),
        gave_up: Default::default(),
    })
    .await
    .unwrap();
    k.wait_for(&sup, &[1, 1, 1, 1]).await;
    k.boom(1);
    k.wait_for(&sup, &[1, 2, 2, 2]).await;
    // A command restart is the same walk, and is not a failure.
    sup.restart_from("w2").await.unwrap();
    assert_eq!(k.starts(), vec![1, 2, 3, 3]);
    let st = sup.status().await.unwrap();
    assert_eq!(
        st.iter().map(|c| c.restarts).collect::<Vec<_>>(),
        vec![0, 1, 0, 0]
    );
    assert!(sup.restart_from("nope").await.is_err());
    sup.shutdown().await;
}

/// Records what its linked children do.
#[derive(Debug, Default)]
struct Parent;

impl Actor for Parent {
    type Msg = ();
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        tx: mpsc::UnboundedSender<String>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, e) = evt {
            let _ = tx.send(e.to_string());
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_child_failing_too_often_escalates_to_the_parent() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (parent, _pj) = Actor::spawn(None, Parent, tx).await.unwrap();
    let (k, specs) = kids(&[Strategy::OneForOne, Strategy::OneForOne]);
    let gave_up: Arc<std::sync::OnceLock<String>> = Arc::default();
    let (sup, _j) = SupervisorHandle::spawn_linked(
        SupervisorArgs {
            name: "inner".into(),
            children: specs,
            intensity: Intensity {
                max_restarts: 2,
                ..fast()
            },
            gave_up: gave_up.clone(),
        },
        parent.get_cell(),
    )
    .await
    .unwrap();
    for n in 2..=3 {
        k.boom(0);
        k.wait_for(&sup, &[n, 1]).await;
    }
    // The third failure within the window is one too many.
    k.boom(0);
    let why = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the parent hears of it")
        .unwrap();
    assert!(why.contains("3 restarts"), "{why}");
    // Its owner can read the same reason.
    assert_eq!(gave_up.get().map(String::as_str), Some(why.as_str()));
    // The supervisor took its children down with it.
    let sibling = k.refs[1].lock().unwrap().clone().unwrap();
    for _ in 0..1000 {
        if sibling.get_status() == ractor::ActorStatus::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(sibling.get_status(), ractor::ActorStatus::Stopped);
    parent.stop(None);
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let i = Intensity {
        max_restarts: 3,
        within: Duration::from_secs(1),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
    };
    let b: Vec<u128> = (1..=5).map(|n| i.backoff(n).as_millis()).collect();
    assert_eq!(b, vec![100, 200, 400, 500, 500]);
}
