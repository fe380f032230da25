#!/usr/bin/env python
"""Start a Dask cluster on SLURM or SGE through dask-jobqueue and keep it up.

The scheduler runs inside this process (on the host where you start it, e.g. the
login node); the workers are batch jobs rendered from the Dask config
(cluster/jobqueue.yaml). The scheduler address goes to --scheduler-file, which
emdist reads:

    export DASK_CONFIG=$PWD/cluster/jobqueue.yaml
    python cluster/start_jobqueue.py slurm --jobs 4 --scheduler-file /shared/emdist/sched.json &
    emdist train data/train exp/ubm --scheduler-file /shared/emdist/sched.json --wait-workers 32

Stop it with Ctrl-C or `kill PID` (SIGTERM): the jobs are cancelled (scancel /
qdel) and the scheduler file is removed. `--dry-run` prints the job script and
exits without submitting anything.

The jobs are submitted before the launcher prints how to attach: a submission that
the batch system refuses (a queue, partition or parallel environment that does not
exist, a request that no node can meet) ends the launcher with exit status 1 and the
batch system's own message on one line. While it runs, the launcher asks the batch
system every --poll seconds (squeue / qstat) which of its jobs are still there. A job
that has ended (scancel, qdel, its walltime, a failed node) is replaced by a new one,
so a driver that is attached rides through it: Dask reruns the lost tasks on the new
workers, with the same results. The launcher gives up, with exit status 1 and a
message, when a replacement is refused, when MAX_FAILED_STARTS jobs in a row end before
any of their workers connected (a broken job script: see the job's output), or when an
SGE job is in error state (Eqw).

If the Dask config sets distributed.comm.require-encryption (cluster/tls/dask-tls.yaml),
the cluster uses TLS: the scheduler takes the scheduler cert, the workers get the
worker cert paths on their command line (the files must be readable on every node).
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import dask

SYSTEMS = {"slurm": "SLURMCluster", "sge": "SGECluster"}
STATUS_COMMANDS = {"slurm": "squeue", "sge": "qstat"}
# squeue states of a job that is over or ending (its workers are gone or going)
SLURM_ENDED = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "COMPLETING", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "STOPPED", "TIMEOUT",
}
MAX_FAILED_STARTS = 3
PROG = "start_jobqueue.py"


class LauncherError(Exception):
    """Ends the launcher with exit status 1 and this one-line message."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("system", choices=sorted(SYSTEMS), help="batch system")
    p.add_argument("--jobs", type=int, default=1, help="number of batch jobs (default 1)")
    p.add_argument("--scheduler-file", help="JSON file for the scheduler address (required "
                   "unless --dry-run); put it on the shared filesystem")
    p.add_argument("--host", help="address the scheduler binds to (default: all interfaces, "
                   "or jobqueue.<system>.interface)")
    p.add_argument("--dashboard-address", help="overrides scheduler-options.dashboard_address")
    p.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    p.add_argument("--poll", type=float, default=10.0,
                   help="seconds between checks that the jobs are still there (default 10)")
    args = p.parse_args(argv)
    if not args.dry_run and not args.scheduler_file:
        p.error("--scheduler-file is required unless --dry-run")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.poll <= 0:
        p.error("--poll must be positive")
    return args


def check_one_thread(system: str, job_script: str) -> None:
    cores = dask.config.get(f"jobqueue.{system}.cores")
    processes = dask.config.get(f"jobqueue.{system}.processes")
    if cores is None or processes is None:
        sys.exit(f"jobqueue.{system}.cores and .processes must be set in the Dask config "
                 f"(DASK_CONFIG={os.environ.get('DASK_CONFIG', '')!r})")
    nthreads = re.findall(r"--nthreads\s+(\S+)", job_script)
    if not nthreads or nthreads[-1] != "1":
        sys.exit(f"the worker command must end up with --nthreads 1, got {nthreads}: "
                 f"set jobqueue.{system}.cores equal to processes ({cores} != {processes})")


def batch_message(exc: BaseException) -> str:
    """The batch system's own words from a failed submission, on one line.

    dask-jobqueue raises RuntimeError("Command exited with non-zero exit code ...
    stderr: ...") when sbatch/qsub exit non-zero, and ValueError when their output
    holds no job id."""
    text = str(exc)
    m = re.search(r"Exit code: (-?\d+)\nCommand:\n(.*?)\nstdout:\n(.*?)\nstderr:\n(.*)\Z",
                  text, re.S)
    if m:
        code, cmd, out, err = m.groups()
        lines = [line.strip() for line in (err.strip() or out.strip()).splitlines()]
        lines = [line for line in lines if line and line != "Exiting."]
        words = "; ".join(dict.fromkeys(lines)) or "no output"
        return f"{cmd.split()[0]} exited with status {code}: {words}"
    if "Could not parse job id" in text:
        out = " ".join(text.split("output is:", 1)[-1].split())
        return f"no job id in the submission's output: {out or '(none)'}"
    return " ".join(text.split()) or type(exc).__name__


def submit(cluster, names: list[str]) -> None:
    """Bring the cluster's jobs to its worker spec now, here, so that a refusal raises.

    (cluster.scale() submits in a callback on the event loop: a refused submission went
    to the log as a tornado traceback, and the launcher stayed up without workers.)"""
    try:
        cluster.sync(cluster._correct_state)
    except (RuntimeError, ValueError) as exc:
        from distributed.core import Status

        for name in names:  # jobs that never were: nothing to cancel when closing
            job = cluster.workers.get(name)
            if job is not None and not getattr(job, "job_id", None):
                job.status = Status.failed
                del cluster.workers[name]
                cluster.worker_spec.pop(name, None)
        what = "the job" if len(names) == 1 else f"one of {len(names)} jobs"
        raise LauncherError(f"{what} was not submitted: {batch_message(exc)}") from None


def add_jobs(cluster, n: int) -> list[str]:
    """n new entries in the worker spec, under names never used before."""
    names = []
    for _ in range(n):
        spec = cluster.new_worker_spec()
        cluster.worker_spec.update(spec)
        names += list(spec)
    return names


def job_states(system: str) -> dict[str, str] | None:
    """Job id -> state of the user's jobs, from squeue / qstat; None if they did not
    answer (a job is then not taken for gone)."""
    user = getpass.getuser()
    if system == "slurm":
        cmd = ["squeue", "-h", "-u", user, "-o", "%i %T"]
    else:
        cmd = ["qstat", "-u", user]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if system == "slurm" and len(fields) >= 2:
            states[fields[0]] = fields[1]
        elif system == "sge" and len(fields) >= 5 and fields[0].isdigit():
            states[fields[0]] = fields[4]
    return states


def sge_error_reason(job_id: str) -> str:
    try:
        out = subprocess.run(["qstat", "-j", job_id], capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    # "error reason    1:          12/04/2026 23:00:09 [0:4242]: can't chdir to ..."
    reasons = [re.sub(r"^\S+ \S+ \[[\d:]+\]: ", "", line.split(":", 1)[1].strip())
               for line in out.splitlines() if line.startswith("error reason")]
    return reasons[0] if reasons else ""


class JobWatch:
    """Replaces the cluster's jobs that have ended; raises LauncherError when it cannot."""

    def __init__(self, system: str, cluster) -> None:
        self.system = system
        self.cluster = cluster
        self.connected: set[str] = set()  # spec names whose workers have connected
        self.failed_starts = 0

    def _note_connected(self) -> None:
        names = {str(w.get("name")) for w in self.cluster.scheduler_info["workers"].values()}
        for spec in self.cluster.worker_spec:
            if any(n == spec or n.startswith(f"{spec}-") for n in names):
                self.connected.add(spec)

    def check(self) -> None:
        self._note_connected()
        states = job_states(self.system)
        if states is None:
            return
        for name, job in list(self.cluster.workers.items()):
            job_id = getattr(job, "job_id", None)
            if name not in self.cluster.worker_spec or not job_id:
                continue
            state = states.get(job_id)
            if self.system == "sge" and state and "E" in state:
                reason = sge_error_reason(job_id)
                raise LauncherError(f"job {job_id} is in error state ({state})"
                                    + (f": {reason}" if reason else "; see qstat -j " + job_id))
            if state is not None and (self.system == "sge" and "d" not in state
                                      or self.system == "slurm" and state not in SLURM_ENDED):
                continue
            self._replace(name, job_id, state)

    def _replace(self, name: str, job_id: str, state: str | None) -> None:
        ended = f"job {job_id} ({name}) has ended" + (f" ({state})" if state else "")
        if name in self.connected:
            self.failed_starts = 0
        else:
            self.failed_starts += 1
            if self.failed_starts >= MAX_FAILED_STARTS:
                raise LauncherError(
                    f"{ended}; {self.failed_starts} jobs in a row ended before any of their "
                    f"workers connected: see the output of job {job_id}")
        (new,) = add_jobs(self.cluster, 1)  # before the old name goes: a new name
        del self.cluster.worker_spec[name]  # its job is cancelled (if still there)
        submit(self.cluster, [new])
        new_id = getattr(self.cluster.workers.get(new), "job_id", None)
        print(f"{ended}; submitted job {new_id} ({new}) in its place", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import dask_jobqueue
    except ImportError:
        sys.exit("dask-jobqueue is not installed: pip install dask-jobqueue")
    from distributed import Security

    cluster_cls = getattr(dask_jobqueue, SYSTEMS[args.system])
    submit_command = cluster_cls.job_cls.submit_command
    if not args.dry_run and shutil.which(submit_command) is None:
        sys.exit(f"{submit_command} not found on PATH: run this on a {args.system} submit host")

    scheduler_options = dict(
        dask.config.get(f"jobqueue.{args.system}.scheduler-options", None) or {}
    )
    if args.host:
        scheduler_options["host"] = args.host
    if args.dashboard_address:
        scheduler_options["dashboard_address"] = args.dashboard_address
    if args.scheduler_file and not args.dry_run:
        scheduler_options["scheduler_file"] = os.path.abspath(args.scheduler_file)

    security = None
    if dask.config.get("distributed.comm.require-encryption", None):
        security = Security()  # certificate paths from distributed.comm.tls.*

    cluster = cluster_cls(scheduler_options=scheduler_options, security=security)
    try:
        script = cluster.job_script()
        check_one_thread(args.system, script)
        print(script, flush=True)
        if args.dry_run:
            return 0

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())

        submit(cluster, add_jobs(cluster, args.jobs))
        watch = JobWatch(args.system, cluster)
        if shutil.which(STATUS_COMMANDS[args.system]) is None:
            watch = None
            print(f"{STATUS_COMMANDS[args.system]} not found: jobs that end are not "
                  "replaced", flush=True)
        ids = " ".join(str(getattr(j, "job_id", "")) for j in cluster.workers.values())
        nproc = dask.config.get(f"jobqueue.{args.system}.processes")
        print(f"jobs: {ids}\n"
              f"scheduler: {cluster.scheduler_address}\n"
              f"scheduler file: {scheduler_options['scheduler_file']}\n"
              f"dashboard: {cluster.dashboard_link}\n"
              f"submitted {args.jobs} jobs of {nproc} worker processes; attach with\n"
              f"  emdist train DATA_DIR EXP_DIR --scheduler-file "
              f"{scheduler_options['scheduler_file']} --wait-workers {args.jobs * nproc}\n"
              f"Ctrl-C or kill {os.getpid()} cancels the jobs.", flush=True)
        while not stop.wait(args.poll):
            if watch is not None:
                watch.check()
        print("stopping: cancelling jobs", flush=True)
    except LauncherError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
