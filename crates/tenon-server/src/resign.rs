//! Re-signing many devices without stopping the world.
//!
//! A change that reaches many devices (a tenant setting, a group, an import, a signature) only
//! queues the devices it may affect ([`Resigner::enqueue`] returns a [`Ticket`] with a generation
//! and the number of devices) and answers. One task ([`AppState::run_resigner`]) takes everything
//! queued and works through it in chunks:
//!
//! 1. copy the chunk's device metadata under a short read lock of the world;
//! 2. compile and sign the envelopes on blocking threads (one per core but one), holding no lock at all
//!    (the directory is shared as an `Arc` snapshot; a write meanwhile copies it once);
//! 3. commit the chunk in one transaction under the world's write lock and swap the envelopes
//!    into the check-in index.
//!
//! Reports, enrollments and admin writes wait at most for one chunk's commit. A device whose
//! envelope was re-issued by someone else between 1 and 3 (its version moved, or it was compiled
//! from a newer directory) is skipped: what it holds is at least as new. Changes that arrive
//! while a run is going are coalesced into the next run; a generation counts as complete when the
//! run that took it has committed, so `completed >= ticket.generation` means the change is on
//! every device's check-in.

use crate::state::{AppState, DeviceMeta, World};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tenon_core::directory::Directory;
use tenon_core::envelope::IssuedEnvelope;

/// Devices per chunk: small enough that a chunk's commit (one transaction, under the world's
/// write lock) stays far below the 100 ms a report may wait, large enough that the fsync per
/// chunk does not dominate.
const CHUNK: usize = 500;

/// What an admin change gets back: its generation and how many devices it may affect.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    pub generation: u64,
    pub devices: usize,
}

/// The last completed run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Completed {
    pub generation: u64,
    /// Devices that run re-issued (those whose payload really changed, or whose envelope neared
    /// expiry or was signed by a rotated key).
    pub resigned: usize,
}

#[derive(Default)]
struct Pending {
    ids: HashSet<String>,
    requested: u64,
}

pub struct Resigner {
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
    completed: tokio::sync::watch::Sender<Completed>,
    /// Progress of the run in hand.
    total: AtomicUsize,
    done: AtomicUsize,
}

impl Default for Resigner {
    fn default() -> Self {
        Self {
            pending: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            completed: tokio::sync::watch::Sender::new(Completed::default()),
            total: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        }
    }
}

impl Resigner {
    /// Queues `ids` for re-signing; returns at once.
    pub fn enqueue(&self, ids: impl IntoIterator<Item = String>) -> Ticket {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut devices = 0;
        for id in ids {
            devices += 1;
            p.ids.insert(id);
        }
        p.requested += 1;
        let generation = p.requested;
        drop(p);
        self.wake.notify_one();
        Ticket { generation, devices }
    }

    /// Waits up to `timeout` for the ticket's change to be on every device's check-in. `Some`
    /// with the completing run once it is.
    pub async fn wait(&self, ticket: Ticket, timeout: Duration) -> Option<Completed> {
        let mut rx = self.completed.subscribe();
        let done = tokio::time::timeout(timeout, rx.wait_for(|c| c.generation >= ticket.generation)).await;
        match done {
            Ok(Ok(c)) => Some(*c),
            _ => None,
        }
    }

    /// The generation of the latest change queued.
    pub fn requested(&self) -> u64 {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).requested
    }

    pub fn completed(&self) -> Completed {
        *self.completed.borrow()
    }

    /// `(queued, done, total)`: devices waiting for the next run, and the run in hand's progress.
    pub fn progress(&self) -> (usize, usize, usize) {
        let queued = self.pending.lock().unwrap_or_else(|e| e.into_inner()).ids.len();
        (queued, self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    fn take(&self) -> (Vec<String>, u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<String> = std::mem::take(&mut p.ids).into_iter().collect();
        let requested = p.requested;
        drop(p);
        // In key order: each chunk's updates then touch neighbouring B-tree pages.
        ids.sort_unstable();
        (ids, requested)
    }

    /// Puts back what a failed run did not commit (its generation stays incomplete).
    pub(crate) fn requeue(&self, ids: impl IntoIterator<Item = String>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.ids.extend(ids);
        drop(p);
        self.wake.notify_one();
    }
}

/// One device's envelope, signed outside any lock, to be committed if the device is still where
/// it was when it was compiled.
pub(crate) struct Prepared {
    pub id: String,
    pub base_version: u64,
    pub issued: IssuedEnvelope,
}

impl AppState {
    /// The re-signing task: runs for the life of the server.
    pub async fn run_resigner(self: Arc<Self>) {
        loop {
            let (ids, generation) = self.resign.take();
            if ids.is_empty() {
                if generation > self.resign.completed().generation {
                    self.resign.completed.send_replace(Completed { generation, resigned: 0 });
                }
                self.resign.wake.notified().await;
                continue;
            }
            let started = std::time::Instant::now();
            let n = ids.len();
            match self.resign_run(ids).await {
                Ok(resigned) => {
                    if n >= CHUNK {
                        tracing::info!(
                            devices = n,
                            resigned,
                            ms = started.elapsed().as_millis() as u64,
                            "re-signed the devices a change reached"
                        );
                    }
                    self.resign.completed.send_replace(Completed { generation, resigned });
                }
                Err((e, left)) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        devices = left.len(),
                        "cannot re-sign devices; will retry in a second"
                    );
                    self.resign.requeue(left);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            self.resign.total.store(0, Ordering::Relaxed);
            self.resign.done.store(0, Ordering::Relaxed);
        }
    }

    /// Re-signs `ids` chunk by chunk; on failure returns the ids not yet committed.
    async fn resign_run(self: &Arc<Self>, ids: Vec<String>) -> Result<usize, (anyhow::Error, Vec<String>)> {
        self.resign.total.store(ids.len(), Ordering::Relaxed);
        self.resign.done.store(0, Ordering::Relaxed);
        let (directory, dir_gen) = {
            let world = self.world.read().await;
            (world.directory.clone(), world.dir_gen)
        };
        let mut resigned = 0;
        // A pipeline of two: chunk k+1 is compiled and signed while chunk k commits.
        let mut in_flight: Option<(usize, tokio::task::JoinHandle<anyhow::Result<Vec<Prepared>>>)> = None;
        let chunks: Vec<&[String]> = ids.chunks(CHUNK).collect();
        for k in 0..=chunks.len() {
            let next = match chunks.get(k) {
                Some(chunk) => {
                    let metas: Vec<(String, DeviceMeta)> = {
                        let world = self.world.read().await;
                        chunk
                            .iter()
                            .filter_map(|id| {
                                world.devices.get(id).filter(|m| m.active).map(|m| (id.clone(), m.clone()))
                            })
                            .collect()
                    };
                    let state = self.clone();
                    let dir = directory.clone();
                    let now = self.now();
                    Some((k, tokio::task::spawn_blocking(move || state.prepare_parallel(&dir, &metas, now))))
                }
                None => None,
            };
            if let Some((done_k, handle)) = in_flight.take() {
                let prepared = handle.await.map_err(anyhow::Error::from).and_then(|r| r);
                let stored = match prepared {
                    Ok(p) if p.is_empty() => Ok(0),
                    Ok(p) => {
                        let t0 = std::time::Instant::now();
                        let mut world = self.world.write().await;
                        let t1 = std::time::Instant::now();
                        let r = self.store_prepared(&mut world, p, dir_gen).await;
                        tracing::debug!(
                            lock_wait_ms = (t1 - t0).as_millis() as u64,
                            store_ms = t1.elapsed().as_millis() as u64,
                            "re-signed a chunk"
                        );
                        r
                    }
                    Err(e) => Err(e),
                };
                match stored {
                    Ok(n) => resigned += n,
                    Err(e) => {
                        if let Some((_, h)) = next {
                            h.abort();
                        }
                        let left = chunks[done_k..].iter().flat_map(|c| c.iter().cloned()).collect();
                        return Err((e, left));
                    }
                }
                self.resign.done.fetch_add(chunks[done_k].len(), Ordering::Relaxed);
            }
            in_flight = next;
        }
        Ok(resigned)
    }

    /// Compiles and signs `metas` on one thread per core but one.
    fn prepare_parallel(
        &self,
        directory: &Directory,
        metas: &[(String, DeviceMeta)],
        now: i64,
    ) -> anyhow::Result<Vec<Prepared>> {
        // One core is left to the requests (check-ins, reports, admin writes) that go on meanwhile;
        // signing the next chunk still takes less than committing this one.
        let threads = std::thread::available_parallelism().map(|n| n.get().saturating_sub(1)).unwrap_or(1).clamp(1, 8);
        if threads == 1 || metas.len() < 64 {
            return self.prepare(directory, metas.iter().map(|(id, m)| (id.as_str(), m)), now);
        }
        let per = metas.len().div_ceil(threads);
        let parts: Vec<anyhow::Result<Vec<Prepared>>> = std::thread::scope(|s| {
            let handles: Vec<_> = metas
                .chunks(per)
                .map(|part| s.spawn(move || self.prepare(directory, part.iter().map(|(id, m)| (id.as_str(), m)), now)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a signing thread panicked"))))
                .collect()
        });
        let mut out = Vec::new();
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }
}

impl World {
    /// The directory for writing; bumps the generation the re-signer compares against. Copies the
    /// directory only when a re-signing run still holds a snapshot of it.
    pub fn directory_mut(&mut self) -> &mut Directory {
        self.dir_gen += 1;
        Arc::make_mut(&mut self.directory)
    }
}
