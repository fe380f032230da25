"""The four batch paths of cluster/ on a real SLURM and a real Grid Engine.

``start_jobqueue.py slurm``, ``slurm/emdist.sbatch``, ``start_jobqueue.py sge`` and
``sge/emdist.qsub`` each train the bundled digits, and final.mdl must have the bytes of a
``--workers 0`` run with the same options. Then: a submission that the batch system
refuses ends the launcher with its message; worker jobs cancelled mid-run (scancel, qdel);
the sbatch job's log of a good run holds no error.

The batch systems are single-node installs from Debian's packages, set up (as root) by
``.ci/batch-systems.sh``, which CI runs before the tests. Without them (no ``sbatch`` /
``qsub``, or daemons that do not answer) every test here skips and says why;
tests/test_cluster_configs.py keeps covering the scripts with faked batch commands.
Everything runs on this host: scheduler and workers bind to the loopback interface.
"""

from __future__ import annotations

import functools
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cluster_configs import (
    CLUSTER,
    JOBQUEUE_YAML,
    QSUB,
    SBATCH,
    TEMPLATE_VENV,
    VENV,
    base_env,
    wait_for_scheduler_file,
)

import emdist

BIN = Path(sys.executable).parent
EMDIST = shutil.which("emdist", path=str(BIN)) or shutil.which("emdist")
DASK = shutil.which("dask", path=str(BIN)) or shutil.which("dask")
LAUNCHER = CLUSTER / "start_jobqueue.py"
DIGITS = emdist.digits_dir("train")
# small and quick: two EM iterations of two diagonal Gaussians per digit
OPTS = ["--num-iters", "2", "--num-gauss", "2", "--cov", "diag", "--nj", "8"]
# long enough (3 to 4 s on two workers) to cancel a job in the middle
LONG_OPTS = ["--num-iters", "30", "--num-gauss", "4", "--cov", "diag", "--nj", "8"]
WAIT = 10  # --wait-timeout of the cancellation tests
LOG_PROBLEMS = re.compile(r"error|cancel|killed|traceback", re.IGNORECASE)
SETUP_HINT = "run `bash .ci/batch-systems.sh` as root to install and start it"


def _run(cmd, timeout=20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@functools.cache
def why_not(system: str) -> str | None:
    """Why ``system`` cannot run jobs on this host, or None when it can."""
    tools = {"slurm": ["sbatch", "squeue", "scancel", "scontrol", "sinfo"],
             "sge": ["qsub", "qstat", "qdel", "qconf"]}[system]
    name = {"slurm": "SLURM", "sge": "Grid Engine"}[system]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{name} is not installed ({missing[0]} not on PATH): {SETUP_HINT}"
    try:
        if system == "slurm":
            out = _run(["sinfo", "-h", "-o", "%P %t"])
            if out.returncode != 0:
                return f"slurmctld is not up ({_last_line(out.stderr)}): {SETUP_HINT}"
            if not {"idle", "mix", "alloc"} & set(out.stdout.split()):
                return (f"no SLURM node takes jobs (sinfo: {out.stdout.strip() or 'no nodes'}):"
                        f" {SETUP_HINT}")
        else:
            out = _run(["qstat", "-f"])
            if out.returncode != 0:
                return f"sge_qmaster is not up ({_last_line(out.stderr)}): {SETUP_HINT}"
            # queue instances without a states column (u, a, d, E, ...) take jobs
            usable = [f for f in map(str.split, out.stdout.splitlines())
                      if f and "@" in f[0] and len(f) == 5]
            if not usable:
                return f"no Grid Engine queue instance takes jobs (qstat -f): {SETUP_HINT}"
            pes = _run(["qconf", "-spl"]).stdout.split()
            if "smp" not in pes:
                return f"Grid Engine has no parallel environment smp: {SETUP_HINT}"
    except subprocess.TimeoutExpired as exc:
        return f"{exc.cmd[0]} did not answer within {exc.timeout:g} s: {SETUP_HINT}"
    return None


def require(system: str) -> None:
    reason = why_not(system)
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------- helpers


def _emdist(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return _run([EMDIST, *args], timeout=timeout, **kw)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """final.mdl bytes of --workers 0 runs, by options."""
    out = {}
    for name, opts in (("short", OPTS), ("long", LONG_OPTS)):
        exp = tmp_path_factory.mktemp("serial") / name
        res = _emdist("train", DIGITS, exp, "--workers", "0", *opts, "--quiet")
        assert res.returncode == 0, res.stderr
        out[name] = (exp / "final.mdl").read_bytes()
    return out


def job_env(**extra) -> dict:
    """The test's environment for submitting: this venv first, no Dask config of the
    caller's, the loopback interface for scheduler and workers."""
    return base_env(EMDIST_VENV=VENV, EMDIST_DASK_INTERFACE="lo", **extra)


def jobqueue_config(tmp_path: Path, system: str, jobs_processes: int = 2, **override) -> Path:
    """cluster/jobqueue.yaml scaled to this host, in a Dask config dir."""
    cfg = yaml.safe_load(JOBQUEUE_YAML.read_text())
    c = cfg["jobqueue"][system]
    n = jobs_processes
    c.update({"cores": n, "processes": n, "memory": f"{n}GiB", "interface": "lo",
              "walltime": "00:10:00"})
    c["job-script-prologue"] = [line.replace(TEMPLATE_VENV, str(VENV))
                                for line in c["job-script-prologue"]]
    if system == "slurm":
        c["job-mem"] = f"{n}G"
        c["job-extra-directives"] = ["--oversubscribe"]
    else:
        c["resource-spec"] = None
        c["job-extra-directives"] = ["-S /bin/bash", f"-pe smp {n}"]
    c.update(override)
    confdir = tmp_path / "dask-config"
    confdir.mkdir(exist_ok=True)
    (confdir / "jobqueue.yaml").write_text(yaml.safe_dump(cfg))
    return confdir


def start_launcher(procs, tmp_path: Path, system: str, confdir: Path, *extra):
    sched_file = tmp_path / f"sched-{system}.json"
    proc = procs.start(
        [sys.executable, LAUNCHER, system, "--scheduler-file", sched_file,
         "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", "--poll", "1", *extra],
        "launcher", env=job_env(DASK_CONFIG=confdir), cwd=tmp_path)
    return proc, sched_file


def launcher_job_ids(procs, proc, timeout=30) -> list[str]:
    """The ids on the launcher's ``jobs:`` line (printed once every job is submitted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"^jobs: (.*)$", procs.log(proc.name), re.M)
        if m:
            return m.group(1).split()
        if proc.poll() is not None:
            pytest.fail(f"launcher exited with {proc.returncode}\n{procs.logs()}")
        time.sleep(0.1)
    pytest.fail(f"launcher printed no job ids in {timeout} s\n{procs.logs()}")


def stop_launcher(procs, proc) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, procs.logs()
    assert "stopping: cancelling jobs" in procs.log(proc.name)


def launcher_cleanup(procs, launcher, system: str) -> None:
    """Stop the launcher first (it would replace jobs cancelled behind its back), then
    cancel every job it ever submitted."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            pass
    log = procs.log(launcher.name)
    ids = re.findall(r"^jobs: (.*)$", log, re.M)[:1]
    ids = (ids[0].split() if ids else []) + re.findall(r"submitted job (\d+)", log)
    cancel(system, *ids)


def cancel(system: str, *job_ids: str) -> None:
    """scancel / qdel these jobs (finalizers: jobs that are gone already are fine)."""
    if job_ids:
        _run(["scancel" if system == "slurm" else "qdel", *job_ids], timeout=30)


def queued_ids(system: str) -> set[str]:
    if system == "slurm":
        out = _run(["squeue", "-h", "-o", "%i %T"]).stdout.split("\n")
        ended = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "COMPLETING"}
        return {f.split()[0] for f in out if f.strip() and f.split()[1] not in ended}
    out = _run(["qstat", "-u", "*"]).stdout.splitlines()
    return {line.split()[0] for line in out
            if line.split() and line.split()[0].isdigit() and "d" not in line.split()[4]}


def wait_gone(system: str, job_ids, timeout=30) -> None:
    deadline = time.monotonic() + timeout
    while set(job_ids) & queued_ids(system) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(job_ids) & queued_ids(system), f"jobs {job_ids} still queued"


def train_on(sched_file: Path, exp: Path, workers: int, opts=OPTS, wait=60, timeout=120):
    return _emdist("train", DIGITS, exp, "--scheduler-file", sched_file, "--wait-workers",
                   workers, "--wait-timeout", wait, *opts, timeout=timeout)


# ----------------------------------------------------------- the four paths, same bytes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("system", ["slurm", "sge"])
def test_start_jobqueue_trains_the_serial_bytes(system, serial, tmp_path, procs):
    require(system)
    launcher, sched_file = start_launcher(procs, tmp_path, system,
                                          jobqueue_config(tmp_path, system))
    ids = launcher_job_ids(procs, launcher)
    try:
        assert len(ids) == 1
        wait_for_scheduler_file(sched_file, procs, launcher, timeout=30)
        res = train_on(sched_file, tmp_path / "exp", 2)
        assert res.returncode == 0, res.stderr + procs.logs()
        assert (tmp_path / "exp" / "final.mdl").read_bytes() == serial["short"]
        assert "running on scheduler" in res.stderr and "with 2 workers" in res.stderr
        stop_launcher(procs, launcher)
        wait_gone(system, ids)  # the launcher cancelled its job
        assert not sched_file.exists()
    finally:
        launcher_cleanup(procs, launcher, system)


def _scontrol(job_id: str) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_slurm_job(job_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _scontrol(job_id)
        if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                    "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}:
            return info
        time.sleep(0.25)
    pytest.fail(f"job {job_id} not done after {timeout} s: {_scontrol(job_id)}")


@pytest.mark.timeout(120)
def test_sbatch_job_trains_the_serial_bytes_and_its_log_shows_no_error(serial, tmp_path):
    require("slurm")
    out = _run(["sbatch", "--parsable", "--ntasks=3", "--mem-per-cpu=1G", "--overcommit",
                "--oversubscribe", "--time=10", SBATCH, "train", DIGITS, tmp_path / "exp",
                *OPTS], env=job_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    try:
        info = wait_slurm_job(job_id, 90)
    finally:
        cancel("slurm", job_id)
    log = (tmp_path / f"emdist-{job_id}.log").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "emdist train exited with status 0" in log
    assert (tmp_path / "exp" / "final.mdl").read_bytes() == serial["short"]
    # the worker step ended cleanly: no "srun: error: ... Killed", no "STEP ... CANCELLED"
    problems = [line for line in log.splitlines() if LOG_PROBLEMS.search(line)]
    assert not problems, log


def _start_scheduler(procs, tmp_path):
    sched_file = tmp_path / "sched.json"
    proc = procs.start([DASK, "scheduler", "--scheduler-file", sched_file, "--host",
                        "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"],
                       "scheduler", env=base_env())
    wait_for_scheduler_file(sched_file, procs, proc)
    return sched_file


def qsub_array(tmp_path, sched_file, tasks=2) -> str:
    env = job_env()
    out = _run(["qsub", "-terse", "-t", f"1-{tasks}", "-l", "h_rt=600,mem_free=1G",
                "-v", f"EMDIST_VENV={VENV},EMDIST_WORKER_MEMORY=1GiB,EMDIST_DASK_INTERFACE=lo",
                QSUB, sched_file], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(".")[0]  # "8.1-2:1" -> "8"


@pytest.mark.timeout(120)
def test_qsub_array_workers_train_the_serial_bytes(serial, tmp_path, procs):
    require("sge")
    sched_file = _start_scheduler(procs, tmp_path)
    job_id = qsub_array(tmp_path, sched_file)
    try:
        res = train_on(sched_file, tmp_path / "exp", 2)
        assert res.returncode == 0, res.stderr + procs.logs()
        assert (tmp_path / "exp" / "final.mdl").read_bytes() == serial["short"]
        names = sorted(p.name for p in tmp_path.glob(f"emdist-worker.o{job_id}.*"))
        assert names == [f"emdist-worker.o{job_id}.1", f"emdist-worker.o{job_id}.2"]
    finally:
        cancel("sge", job_id)
    wait_gone("sge", [job_id])


# ------------------------------------------------------------------- refused submissions


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system,override,message", [
    ("slurm", {"queue": "nosuch"}, "sbatch: error: invalid partition specified: nosuch"),
    ("sge", {"job-extra-directives": ["-S /bin/bash", "-pe nosuch 2"]},
     'the requested parallel environment "nosuch" does not exist'),
], ids=["slurm-partition", "sge-pe"])
def test_refused_submission_ends_the_launcher_with_the_batch_systems_message(
        system, override, message, tmp_path, procs):
    require(system)
    confdir = jobqueue_config(tmp_path, system, **override)
    t0 = time.monotonic()
    out = _run([sys.executable, LAUNCHER, system, "--scheduler-file", tmp_path / "s.json",
                "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
               env=job_env(DASK_CONFIG=confdir), cwd=tmp_path, timeout=45)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("start_jobqueue.py: error: the job was not submitted: "
                                 f"{'sbatch' if system == 'slurm' else 'qsub'} exited with "
                                 "status 1: "), out.stderr
    assert message in out.stderr
    assert "submitted 1 jobs" not in out.stdout and "jobs:" not in out.stdout
    assert not (tmp_path / "s.json").exists()
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------ worker jobs cancelled mid-run


def _when_model(exp: Path, n: int, driver, timeout=60) -> None:
    deadline = time.monotonic() + timeout
    while not (exp / f"{n}.mdl").exists():
        if driver.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {n}.mdl; driver exit {driver.poll()}")
        time.sleep(0.05)


def _driver(procs, tmp_path, sched_file, workers, wait=WAIT):
    exp = tmp_path / "exp"
    proc = procs.start([EMDIST, "train", DIGITS, exp, "--scheduler-file", sched_file,
                        "--wait-workers", workers, "--wait-timeout", wait, *LONG_OPTS],
                       "driver", env=base_env(), cwd=tmp_path)
    return proc, exp


def _cancelled(exp: Path) -> float:
    """When the cancellation was sent; the run was not over then."""
    assert not (exp / "final.mdl").exists(), "the run ended before the cancellation"
    return time.monotonic()


def _stuck_state(workdir: Path, driver) -> str:
    """What a hung run was waiting for: the driver's Python stacks (py-spy, where
    installed), the scheduler's tasks that are not in memory, and the worker jobs' logs."""
    parts = []
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy:
        out = subprocess.run([pyspy, "dump", "--pid", str(driver.pid)], capture_output=True,
                             text=True, timeout=30)
        parts.append("--- driver stacks (py-spy)\n" + out.stdout[-6000:] + out.stderr[-500:])
    sched_files = sorted(workdir.glob("*.json"))
    if sched_files:
        code = ("import sys, distributed\n"
                "c = distributed.Client(scheduler_file=sys.argv[1], timeout=10)\n"
                "def tasks(dask_scheduler):\n"
                "    return sorted((str(k), ts.state, [w.name for w in ts.who_has or ()],\n"
                "                   ts.processing_on.name if ts.processing_on else None)\n"
                "                  for k, ts in dask_scheduler.tasks.items()\n"
                "                  if ts.state != 'memory')\n"
                "print('workers:', [w['name'] for w in c.scheduler_info()['workers'].values()])\n"
                "for t in c.run_on_scheduler(tasks): print(*t)\n"
                "print(c.run(lambda dask_worker: {str(k): ts.state for k, ts in\n"
                "      dask_worker.state.tasks.items() if ts.state != 'memory'}))\n")
        try:
            out = subprocess.run([sys.executable, "-c", code, str(sched_files[0])],
                                 capture_output=True, text=True, timeout=30)
            parts.append("--- scheduler tasks not in memory\n" + out.stdout[-6000:]
                         + out.stderr[-1500:])
        except subprocess.TimeoutExpired:
            parts.append("--- the scheduler did not answer within 30 s")
    for log in sorted(workdir.glob("emdist-worker.o*")):
        parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-4000:])
    return "\n" + "\n".join(parts)


def _outcome(procs, driver, exp, serial_bytes, cancelled_at, lost: str, gone,
             expect: str, bound: float = WAIT + 15) -> str:
    """How the run ended, which must be within --wait-timeout of the loss (plus what was
    left of the training): "bytes" (exit 0, the serial bytes) or "error" (exit 1 and one
    error line that says the workers were lost); ``expect`` is one of these or "either".
    ``gone()`` says that the workers are gone (a scheduler's or the launcher's log): it
    must say so while the driver still runs."""
    gone_mid_run = False
    while driver.poll() is None and time.monotonic() < cancelled_at + bound:
        gone_mid_run = gone_mid_run or bool(gone())
        time.sleep(0.1)
    rc = driver.poll()
    if rc is None:
        state = _stuck_state(exp.parent, driver)
        driver.kill()
        pytest.fail(f"the driver did not end {bound} s after {lost} were cancelled\n"
                    + procs.logs() + state)
    log = procs.log("driver")
    assert gone_mid_run, "the run ended before the workers were gone\n" + procs.logs()
    if rc == 0:
        assert expect in ("bytes", "either"), log[-3000:]
        assert (exp / "final.mdl").read_bytes() == serial_bytes, log[-3000:]
        return "bytes"
    errors = [line for line in log.splitlines() if line.startswith("emdist: error:")]
    assert expect in ("error", "either"), log[-3000:]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert re.search(r"\bworkers? .*\b(lost|gone)\b", errors[0]), errors[0]
    return "error"


@pytest.mark.timeout(120)
def test_scancel_of_one_of_two_launcher_jobs_gives_the_same_bytes(serial, tmp_path,
                                                                  procs):
    """The other job's worker takes over, and the launcher submits a job in place of the
    cancelled one."""
    require("slurm")
    launcher, sched_file = start_launcher(
        procs, tmp_path, "slurm", jobqueue_config(tmp_path, "slurm", jobs_processes=1),
        "--jobs", "2")
    ids = launcher_job_ids(procs, launcher)
    try:
        assert len(ids) == 2
        wait_for_scheduler_file(sched_file, procs, launcher, timeout=30)
        driver, exp = _driver(procs, tmp_path, sched_file, 2)
        _when_model(exp, 2, driver)
        cancel("slurm", ids[0])
        t_cancel = _cancelled(exp)
        _outcome(procs, driver, exp, serial["long"], t_cancel, f"job {ids[0]}'s workers",
                 lambda: f"job {ids[0]} (" in procs.log("launcher"), "bytes")
        deadline = time.monotonic() + 15
        pattern = rf"job {ids[0]} \(\S+\) has ended.*; submitted job (\d+)"
        while not re.search(pattern, procs.log("launcher")) and time.monotonic() < deadline:
            time.sleep(0.2)
        m = re.search(pattern, procs.log("launcher"))
        assert m, procs.log("launcher")
        stop_launcher(procs, launcher)
        wait_gone("slurm", [*ids, m.group(1)])
    finally:
        launcher_cleanup(procs, launcher, "slurm")


@pytest.mark.timeout(120)
def test_qdel_of_one_array_task_gives_the_same_bytes(serial, tmp_path, procs):
    require("sge")
    sched_file = _start_scheduler(procs, tmp_path)
    job_id = qsub_array(tmp_path, sched_file)
    try:
        driver, exp = _driver(procs, tmp_path, sched_file, 2)
        _when_model(exp, 2, driver)
        out = _run(["qdel", job_id, "-t", "1"])  # the task range follows its job
        assert out.returncode == 0, out.stderr
        removed = re.compile(rf"Remove worker addr: \S+ name: sge-{job_id}-1\b")
        _outcome(procs, driver, exp, serial["long"], _cancelled(exp),
                 f"task 1 of job {job_id}", lambda: removed.search(procs.log("scheduler")),
                 "bytes")
    finally:
        cancel("sge", job_id)
    wait_gone("sge", [job_id])


@pytest.mark.timeout(120)
def test_qdel_of_every_array_task_is_an_error_naming_the_lost_workers(serial, tmp_path,
                                                                     procs):
    """Nothing replaces the workers: the run ends --wait-timeout after they are gone, with
    exit status 1 and one line that says so and names the last complete model."""
    require("sge")
    wait = 5
    sched_file = _start_scheduler(procs, tmp_path)
    job_id = qsub_array(tmp_path, sched_file)
    try:
        driver, exp = _driver(procs, tmp_path, sched_file, 2, wait=wait)
        _when_model(exp, 2, driver)
        cancel("sge", job_id)
        removed = re.compile(rf"Remove worker addr: \S+ name: sge-{job_id}-\d\b")
        t_cancel = _cancelled(exp)
        _outcome(procs, driver, exp, serial["long"], t_cancel, f"job {job_id}",
                 lambda: removed.search(procs.log("scheduler")), "error", bound=2 * wait + 10)
        took = time.monotonic() - t_cancel
        assert re.search(r"last complete model.*\d+\.mdl", procs.log("driver")), \
            procs.log("driver")[-2000:]
    finally:
        cancel("sge", job_id)
    wait_gone("sge", [job_id])
    # within --wait-timeout of the loss, plus the batch system's own time to kill the jobs
    assert took <= wait + 8, took


@pytest.mark.timeout(120)
def test_qdel_of_the_only_launcher_job_ends_within_the_wait_timeout(serial, tmp_path,
                                                                     procs):
    """Every worker is lost at once. The launcher submits a job in its place; the run
    must end in the same bytes, or in an error naming the lost workers."""
    require("sge")
    launcher, sched_file = start_launcher(procs, tmp_path, "sge",
                                          jobqueue_config(tmp_path, "sge"))
    ids = launcher_job_ids(procs, launcher)
    try:
        wait_for_scheduler_file(sched_file, procs, launcher, timeout=30)
        driver, exp = _driver(procs, tmp_path, sched_file, 2)
        _when_model(exp, 2, driver)
        cancel("sge", ids[0])
        t_cancel = _cancelled(exp)
        replaced = re.compile(rf"^job {ids[0]} \(\S+\) has ended.*; submitted job \d+",
                              re.M)
        # gone: the launcher says so, or the driver has failed already
        _outcome(procs, driver, exp, serial["long"], t_cancel, "all workers",
                 lambda: replaced.search(procs.log("launcher")) or driver.poll(), "either")
        assert replaced.search(procs.log("launcher")), procs.log("launcher")
    finally:
        launcher_cleanup(procs, launcher, "sge")


def test_skip_reasons_name_the_set_up():
    """Whatever the host has, the reasons say what is missing and how to get it."""
    for system in ("slurm", "sge"):
        reason = why_not(system)
        assert reason is None or SETUP_HINT in reason, reason

