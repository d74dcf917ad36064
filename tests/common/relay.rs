//! A user-space UDP relay that impairs the path between a client and a server: loss, delay,
//! jitter (hence reordering), duplication and a rate limit with a bounded queue. The kernel
//! here has no netem, so tests that need a bad network route through this.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Rng;

/// How the relay mistreats datagrams, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Probability a datagram is dropped.
    pub loss: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra random delay, uniform in [0, jitter]; reorders datagrams.
    pub jitter: Duration,
    /// Probability a datagram is sent twice.
    pub duplicate: f64,
    /// Link rate in bytes per second (None: unlimited).
    pub rate: Option<u64>,
    /// Bytes the link may queue before it drops (tail drop), when rate-limited.
    pub queue_bytes: u64,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            duplicate: 0.0,
            rate: None,
            queue_bytes: 256 * 1024,
        }
    }
}

/// What the relay did.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// While set, every datagram is dropped (the link is cut).
    pub cut: std::sync::atomic::AtomicBool,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
}

/// A running relay; stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    pub stats: Arc<RelayStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Pending {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
    to: SocketAddr,
    via: Arc<UdpSocket>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Min-heap on (time, seq).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A datagram, where it goes, and the socket it leaves by.
type Datagram = (Vec<u8>, SocketAddr, Arc<UdpSocket>);

/// One direction of the path: decides each datagram's fate and delivers it on time.
fn link(
    imp: Impairment,
    seed: u64,
    stats: Arc<RelayStats>,
) -> (mpsc::Sender<Datagram>, tokio::task::JoinHandle<()>) {
    // Bounded like a router's input queue: when full, datagrams are dropped.
    let (tx, mut rx) = mpsc::channel::<Datagram>(4096);
    let task = tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut next_free = Instant::now();
        let uniform = |rng: &mut Rng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        loop {
            let sleep_until = heap.peek().map(|p: &Pending| p.at);
            tokio::select! {
                msg = rx.recv() => {
                    let Some((data, to, via)) = msg else { return };
                    if stats.cut.load(Ordering::Acquire) || uniform(&mut rng) < imp.loss {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let now = Instant::now();
                    let mut at = now;
                    if let Some(rate) = imp.rate {
                        let start = next_free.max(now);
                        let queued = start.saturating_duration_since(now).as_secs_f64() * rate as f64;
                        if queued > imp.queue_bytes as f64 {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        next_free = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
                        at = next_free;
                    }
                    let copies = if uniform(&mut rng) < imp.duplicate {
                        stats.duplicated.fetch_add(1, Ordering::Relaxed);
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let jitter = imp.jitter.mul_f64(uniform(&mut rng));
                        seq += 1;
                        heap.push(Pending { at: at + imp.delay + jitter, seq, data: data.clone(), to, via: via.clone() });
                    }
                }
                _ = async { tokio::time::sleep_until(sleep_until.unwrap()).await }, if sleep_until.is_some() => {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|p| p.at <= now) {
                        let p = heap.pop().unwrap();
                        let _ = p.via.send_to(&p.data, p.to).await;
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    (tx, task)
}

impl Relay {
    /// Cuts the link (every datagram dropped, both ways) or restores it.
    pub fn cut(&self, cut: bool) {
        self.stats.cut.store(cut, Ordering::Release);
    }

    /// A relay on 127.0.0.1 that forwards every client to `upstream` through its own socket,
    /// impairing both directions.
    pub async fn start(upstream: SocketAddr, imp: Impairment, seed: u64) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let stats = Arc::new(RelayStats::default());
        let (up_tx, up_task) = link(imp, seed, stats.clone());
        let (down_tx, down_task) = link(imp, seed ^ 0x5555, stats.clone());
        let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let front_task = {
            let front = front.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut readers = Vec::new();
                loop {
                    let Ok((n, from)) = front.recv_from(&mut buf).await else {
                        return;
                    };
                    let existing = clients.lock().unwrap().get(&from).cloned();
                    let back = match existing {
                        Some(s) => s,
                        None => {
                            let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                            clients.lock().unwrap().insert(from, s.clone());
                            // Datagrams from the server back to this client.
                            let (s2, front2, down) = (s.clone(), front.clone(), down_tx.clone());
                            let stats2 = stats.clone();
                            readers.push(tokio::spawn(async move {
                                let mut buf = vec![0u8; 65536];
                                loop {
                                    let Ok((n, _)) = s2.recv_from(&mut buf).await else {
                                        return;
                                    };
                                    match down.try_send((buf[..n].to_vec(), from, front2.clone())) {
                                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                                        Err(mpsc::error::TrySendError::Full(_)) => {
                                            stats2.dropped.fetch_add(1, Ordering::Relaxed);
                                        }
                                        Ok(()) => {}
                                    }
                                }
                            }));
                            s
                        }
                    };
                    match up_tx.try_send((buf[..n].to_vec(), upstream, back)) {
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {}
                    }
                }
            })
        };
        Relay {
            addr,
            stats,
            tasks: vec![front_task, up_task, down_task],
        }
    }
}
