//! Data-parallel training over torch.distributed's c10d (issue #18): a safe handle on the C++
//! bridge `c10d_bridge.cpp` (TCPStore rendezvous, ProcessGroupGloo, ProcessGroupNCCL with the
//! `cuda` feature), the torchrun environment, and the `--nproc N` local launcher.
//!
//! Matches `torch.distributed.init_process_group(backend, init_method="env://")` as torchrun
//! drives it: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! (and `TORCHELASTIC_USE_AGENT_STORE`, under which torchrun's agent hosts the store).
//! Collectives: mean all-reduce of a tensor list as one flat buffer (a DDP bucket), broadcast,
//! barrier. Every C++ exception comes back as an [`anyhow::Error`]; a group whose collective
//! failed is never torn down (its peers are gone), the process just exits.
pub mod launch;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

type CTensor = *mut torch_sys::C_tensor;

extern "C" {
    fn lc_dist_free_error(err: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn lc_dist_init(
        backend: *const c_char,
        host: *const c_char,
        port: u16,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        store_is_server: c_int,
        device_index: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn lc_dist_allreduce_mean(
        handle: *mut c_void,
        tensors: *const CTensor,
        n: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn lc_dist_broadcast(
        handle: *mut c_void,
        tensors: *const CTensor,
        n: usize,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn lc_dist_barrier(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn lc_dist_shutdown(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// The collective library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over TCP (always available).
    Gloo,
    /// CUDA tensors over NCCL (the `cuda` feature).
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// `gloo`, `nccl` or `auto` (NCCL for a CUDA device, Gloo otherwise), as `--dist-backend`.
    pub fn choose(name: &str, device: Device) -> Result<Self> {
        match name {
            "gloo" => Ok(Backend::Gloo),
            "nccl" if !cfg!(feature = "cuda") => {
                bail!("--dist-backend nccl needs a loracast built with `--features cuda`")
            }
            "nccl" if !device.is_cuda() => {
                bail!("--dist-backend nccl needs --device cuda (NCCL communicates CUDA tensors)")
            }
            "nccl" => Ok(Backend::Nccl),
            "auto" if device.is_cuda() && cfg!(feature = "cuda") => Ok(Backend::Nccl),
            "auto" => Ok(Backend::Gloo),
            other => bail!("--dist-backend {other}: expected gloo, nccl or auto"),
        }
    }
}

/// Where this process sits in the job (from the torchrun environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the TCPStore (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank is
    /// a client. Otherwise rank 0 hosts it.
    pub agent_store: bool,
}

impl Topology {
    /// The torchrun variables, or `None` when `WORLD_SIZE` is unset (a single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`Topology::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, text: &str| -> Result<usize> {
            text.trim()
                .parse()
                .with_context(|| format!("{name}={text:?} is not a non-negative integer"))
        };
        let world = num("WORLD_SIZE", &world)?;
        if world == 0 {
            bail!("WORLD_SIZE must be ≥ 1");
        }
        let rank = match get("RANK") {
            Some(r) => num("RANK", &r)?,
            None if world == 1 => 0,
            None => {
                bail!("WORLD_SIZE={world} but RANK is not set (launch with torchrun or --nproc)")
            }
        };
        if rank >= world {
            bail!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => num("LOCAL_RANK", &r)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
        if master_addr.trim().is_empty() {
            bail!("MASTER_ADDR is empty");
        }
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .with_context(|| format!("MASTER_PORT={p:?} is not a port number (1–65535)"))?,
            None if world == 1 => 29500,
            None => bail!("WORLD_SIZE={world} but MASTER_PORT is not set"),
        };
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        }))
    }
}

/// One process's membership of a process group. World size 1 never creates one: the training
/// loop takes `Option<&Dist>` and `None` is today's single-process path.
pub struct Dist {
    handle: *mut c_void,
    rank: usize,
    world: usize,
    backend: Backend,
    /// Where this backend's buffers live (CPU for Gloo, this rank's GPU for NCCL).
    device: Device,
    timeout: Duration,
    /// A collective failed: the peers are gone, the group must not be torn down.
    poisoned: std::cell::Cell<bool>,
}

/// Takes the bridge's error message (and frees it).
fn take_error(err: *mut c_char, what: &str) -> anyhow::Error {
    if err.is_null() {
        return anyhow::anyhow!("{what} failed (no message)");
    }
    // SAFETY: the bridge returns a NUL-terminated malloc'd string, freed exactly once here.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { lc_dist_free_error(err) };
    // c10d messages can span lines (hints, source locations): keep them on one.
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    anyhow::anyhow!("{what}: {msg}")
}

impl Dist {
    /// Joins the process group of `topo` (blocks until every rank has joined, or fails after
    /// `timeout`). `device` is this rank's device (NCCL: `cuda:LOCAL_RANK`).
    pub fn init(
        topo: &Topology,
        backend: Backend,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        let rank = c_int::try_from(topo.rank).context("RANK too large")?;
        let world = c_int::try_from(topo.world).context("WORLD_SIZE too large")?;
        let timeout_ms = i64::try_from(timeout.as_millis())
            .ok()
            .filter(|&t| t > 0)
            .context("--dist-timeout must be positive")?;
        let device_index = match device {
            Device::Cuda(i) => c_int::try_from(i).context("CUDA device index")?,
            _ => -1,
        };
        let host = CString::new(topo.master_addr.as_str()).context("MASTER_ADDR has a NUL byte")?;
        let name = CString::new(backend.name())?;
        let server = (!topo.agent_store && topo.rank == 0) as c_int;
        let label = format!(
            "rank {} of {}: joining the {} process group at {}:{}",
            topo.rank,
            topo.world,
            backend.name(),
            topo.master_addr,
            topo.master_port
        );
        // c10d's client retries its connect past the timeout: a watchdog holds the deadline.
        let (done, watch) = std::sync::mpsc::channel::<()>();
        let deadline = timeout + Duration::from_secs(1);
        let what = label.clone();
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(deadline) {
                eprintln!(
                    "error: {what}: no rendezvous within {:.0} s (--dist-timeout): is the master reachable, and did every rank start?",
                    deadline.as_secs_f64()
                );
                // SAFETY: ends the process at once, without running destructors that could
                // wait on the stuck rendezvous.
                unsafe { libc::_exit(1) };
            }
        });
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings outlive the call; the bridge catches every
        // exception and reports through `err`.
        let handle = unsafe {
            lc_dist_init(
                name.as_ptr(),
                host.as_ptr(),
                topo.master_port,
                rank,
                world,
                timeout_ms,
                server,
                device_index,
                &mut err,
            )
        };
        drop(done);
        let _ = watchdog.join();
        if handle.is_null() {
            return Err(take_error(err, &label));
        }
        Ok(Self {
            handle,
            rank: topo.rank,
            world: topo.world,
            backend,
            device: match backend {
                Backend::Nccl => device,
                Backend::Gloo => Device::Cpu,
            },
            timeout,
            poisoned: std::cell::Cell::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The device of this group's communication buffers.
    pub fn device(&self) -> Device {
        self.device
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check(&self, rc: c_int, err: *mut c_char, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        self.poisoned.set(true);
        Err(take_error(
            err,
            &format!("rank {} of {}: {what} failed", self.rank, self.world),
        ))
    }

    fn pointers(tensors: &[Tensor]) -> Vec<CTensor> {
        // The bridge only writes through the at::Tensor (its storage), never the handle.
        tensors.iter().map(|t| t.as_ptr() as CTensor).collect()
    }

    /// Replaces every tensor by its mean over the ranks, in place: the list travels as one
    /// flat buffer, in one collective (all tensors must share dtype and device).
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let ptrs = Self::pointers(tensors);
        let mut err = std::ptr::null_mut();
        // SAFETY: `ptrs` are live at::Tensor handles for the duration of the call.
        let rc =
            unsafe { lc_dist_allreduce_mean(self.handle, ptrs.as_ptr(), ptrs.len(), &mut err) };
        self.check(rc, err, "all-reduce")
    }

    /// Overwrites every tensor with rank `root`'s values, in place, in one collective.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        let root = c_int::try_from(root).context("broadcast root")?;
        let ptrs = Self::pointers(tensors);
        let mut err = std::ptr::null_mut();
        // SAFETY: as in all_reduce_mean.
        let rc =
            unsafe { lc_dist_broadcast(self.handle, ptrs.as_ptr(), ptrs.len(), root, &mut err) };
        self.check(rc, err, "broadcast")
    }

    /// Blocks until every rank has reached the barrier (or fails after the timeout).
    pub fn barrier(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle.
        let rc = unsafe { lc_dist_barrier(self.handle, &mut err) };
        self.check(rc, err, "barrier")
    }

    /// Leaves the group cleanly (every rank should call it at the end of a successful run).
    pub fn shutdown(mut self) -> Result<()> {
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        if handle.is_null() || self.poisoned.get() {
            return Ok(());
        }
        let mut err = std::ptr::null_mut();
        // SAFETY: the handle is destroyed exactly once (nulled above).
        let rc = unsafe { lc_dist_shutdown(handle, &mut err) };
        match rc {
            0 => Ok(()),
            _ => Err(take_error(err, "leaving the process group")),
        }
    }

    /// One value per rank that must be equal everywhere (e.g. a config fingerprint): rank 0's
    /// is broadcast, every rank compares, and all ranks fail together when any differs.
    pub fn agree(&self, value: i64, what: &str) -> Result<()> {
        let t = Tensor::from_slice(&[value]).to_device(self.device);
        self.broadcast(std::slice::from_ref(&t), 0)?;
        let differs = t.int64_value(&[0]) != value;
        let flag = Tensor::from_slice(&[differs as u8 as f32]).to_device(self.device);
        self.all_reduce_mean(std::slice::from_ref(&flag))?;
        if flag.double_value(&[0]) > 0.0 {
            bail!(
                "rank {} of {}: the ranks disagree on {what}{} (start every rank with the same command and files)",
                self.rank,
                self.world,
                if differs { " (this rank's differs from rank 0's)" } else { "" }
            );
        }
        Ok(())
    }
}

impl Drop for Dist {
    fn drop(&mut self) {
        if !self.handle.is_null() && !self.poisoned.get() {
            let mut err = std::ptr::null_mut();
            // SAFETY: the handle is live and destroyed only here.
            let rc = unsafe { lc_dist_shutdown(self.handle, &mut err) };
            if rc != 0 && !err.is_null() {
                // SAFETY: the bridge's message, freed once.
                unsafe { lc_dist_free_error(err) };
            }
        }
    }
}

/// A 64-bit FNV-1a fingerprint of some bytes (for [`Dist::agree`]).
pub fn fingerprint(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// This rank's share of a global batch: ranks hold equal, contiguous blocks of rows
/// (`rank·n/world ..`), so N ranks together hold the one-process batch in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const FULL: Shard = Shard { rank: 0, world: 1 };

    pub fn of(dist: Option<&Dist>) -> Self {
        dist.map_or(Self::FULL, |d| Shard {
            rank: d.rank(),
            world: d.world(),
        })
    }

    pub fn is_full(&self) -> bool {
        self.world == 1
    }

    /// The rows of a global batch of `n` this rank holds; `n` must divide evenly (each rank's
    /// mean loss then weighs as much as its share, and the mean of the means is the mean).
    pub fn rows(&self, n: usize, what: &str) -> Result<std::ops::Range<usize>> {
        if self.world == 0 || !n.is_multiple_of(self.world) {
            bail!(
                "the world size {} does not divide the global batch of {n} {what}: choose a batch that is a multiple of the number of processes",
                self.world
            );
        }
        let b = n / self.world;
        Ok(self.rank * b..(self.rank + 1) * b)
    }
}
