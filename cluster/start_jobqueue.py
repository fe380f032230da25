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

If the Dask config sets distributed.comm.require-encryption (cluster/tls/dask-tls.yaml),
the cluster uses TLS: the scheduler takes the scheduler cert, the workers get the
worker cert paths on their command line (the files must be readable on every node).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import threading

import dask

SYSTEMS = {"slurm": "SLURMCluster", "sge": "SGECluster"}


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
    args = p.parse_args(argv)
    if not args.dry_run and not args.scheduler_file:
        p.error("--scheduler-file is required unless --dry-run")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import dask_jobqueue
    except ImportError:
        sys.exit("dask-jobqueue is not installed: pip install dask-jobqueue")
    from distributed import Security

    cluster_cls = getattr(dask_jobqueue, SYSTEMS[args.system])
    submit = cluster_cls.job_cls.submit_command
    if not args.dry_run and shutil.which(submit) is None:
        sys.exit(f"{submit} not found on PATH: run this on a {args.system} submit host")

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

        cluster.scale(jobs=args.jobs)
        nproc = dask.config.get(f"jobqueue.{args.system}.processes")
        print(f"scheduler: {cluster.scheduler_address}\n"
              f"scheduler file: {scheduler_options['scheduler_file']}\n"
              f"dashboard: {cluster.dashboard_link}\n"
              f"submitted {args.jobs} jobs of {nproc} worker processes; attach with\n"
              f"  emdist train DATA_DIR EXP_DIR --scheduler-file "
              f"{scheduler_options['scheduler_file']} --wait-workers {args.jobs * nproc}\n"
              f"Ctrl-C or kill {os.getpid()} cancels the jobs.", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping: cancelling jobs", flush=True)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
