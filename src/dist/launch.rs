//! `--nproc N`: torchrun's `--standalone --nproc-per-node N` for users without torchrun. Spawns
//! N copies of the current executable with the same arguments and the torchrun environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`, a free
//! `MASTER_PORT`), splits the torch threads between them (`OMP_NUM_THREADS`), waits for all,
//! and stops the others as soon as one fails (as torchrun's agent does). Workers die with the
//! launcher (`PR_SET_PDEATHSIG`), so killing the launcher kills the job.
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick for port 0).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot bind a local TCP port for the rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// Torch threads per worker: the launcher's `OMP_NUM_THREADS` (or the CPU count) split in N.
pub fn threads_per_worker(nproc: usize) -> usize {
    let total = std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    (total / nproc.max(1)).max(1)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".to_string(),
    }
}

/// Runs `args` (this executable's arguments) as `nproc` local workers; `Ok` when all succeed.
pub fn spawn_local(nproc: usize, args: &[OsString]) -> Result<()> {
    if nproc < 2 {
        bail!("--nproc must be ≥ 2 to launch workers");
    }
    let exe = std::env::current_exe().context("cannot locate the loracast executable")?;
    let port = free_port()?;
    let threads = threads_per_worker(nproc);
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", threads.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE");
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop(&mut children);
                bail!("cannot start worker {rank} of {nproc}: {e}");
            }
        }
    }
    let mut done = vec![false; nproc];
    loop {
        for rank in 0..nproc {
            if done[rank] {
                continue;
            }
            match children[rank].try_wait() {
                Ok(Some(status)) if status.success() => done[rank] = true,
                Ok(Some(status)) => {
                    stop(&mut children);
                    bail!(
                        "worker rank {rank} of {nproc} failed with {}; stopped the other workers",
                        describe(status)
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    stop(&mut children);
                    bail!("cannot wait for worker rank {rank}: {e}");
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills and reaps every worker still running.
fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}
