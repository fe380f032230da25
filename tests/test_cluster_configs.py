"""Tests of the deployment files in cluster/.

Real `dask scheduler` / `dask worker` processes, bound to 127.0.0.1 (or the
loopback interface) only. The batch systems are faked: `sbatch`/`qsub` run the job
script with bash, `srun` starts one copy per task with SLURM_PROCID set, and a
fake `emdist` driver checks what the batch script hands it. Docker is not run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import Processes, group_alive

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MAKE_CERTS = CLUSTER / "tls" / "make-certs.sh"
TLS_TEMPLATE = CLUSTER / "tls" / "dask-tls.yaml"
JOBQUEUE_YAML = CLUSTER / "jobqueue.yaml"
SBATCH = CLUSTER / "slurm" / "emdist.sbatch"
QSUB = CLUSTER / "sge" / "emdist.qsub"
COMPOSE = CLUSTER / "docker-compose.yml"
SHELL_SCRIPTS = [MAKE_CERTS, SBATCH, QSUB]

VENV = Path(sys.prefix)  # the venv running pytest: has dask, distributed
DASK = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
TEMPLATE_TLS_DIR = "/shared/emdist/tls"
TEMPLATE_VENV = "/shared/emdist/venv"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


# --------------------------------------------------------------------------- helpers


def wait_for_scheduler_file(path: Path, ps: Processes, proc=None, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text())["address"]
            except (ValueError, KeyError):
                pass
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{proc.name} exited with {proc.returncode}\n{ps.logs()}")
        time.sleep(0.1)
    pytest.fail(f"no scheduler file {path} after {timeout} s\n{ps.logs()}")


def make_certs(outdir: Path, *hosts: str) -> Path:
    subprocess.run(["bash", str(MAKE_CERTS), str(outdir), *hosts], check=True,
                   capture_output=True, timeout=30)
    return outdir


def render_tls_template(certdir: Path, dest: Path) -> Path:
    text = TLS_TEMPLATE.read_text().replace(TEMPLATE_TLS_DIR, str(certdir))
    dest.write_text(text)
    return dest


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DASK_") and k not in ("EMDIST_TLS_DIR", "EMDIST_VENV")}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def tls_env(certdir: Path) -> dict:
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certdir / "ca.pem"),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certdir / "client.pem"),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certdir / "client.key"),
    }


def client_security(certdir: Path):
    from distributed import Security

    return Security(
        tls_ca_file=str(certdir / "ca.pem"),
        tls_client_cert=str(certdir / "client.pem"),
        tls_client_key=str(certdir / "client.key"),
        require_encryption=True,
    )


def write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def worker_info(client) -> dict:
    return client.scheduler_info(n_workers=-1)["workers"]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------- (i) TLS


@needs_openssl
@pytest.mark.timeout(60)
def test_make_certs_outputs_and_modes(tmp_path):
    certs = make_certs(tmp_path / "certs", "node1.example.org", "10.1.2.3")
    for name in ("ca", "node", "client"):
        assert stat.S_IMODE((certs / f"{name}.key").stat().st_mode) == 0o600
        assert (certs / f"{name}.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "node.pem"), "-noout", "-text"],
        check=True, capture_output=True, text=True,
    ).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:node1.example.org",
                "IP Address:10.1.2.3"):
        assert san in text
    for leaf in ("node", "client"):
        subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.pem"),
                        str(certs / f"{leaf}.pem")], check=True, capture_output=True)
    # refuses to overwrite an existing CA
    again = subprocess.run(["bash", str(MAKE_CERTS), str(certs)], capture_output=True)
    assert again.returncode != 0 and b"exists" in again.stderr


@needs_openssl
@pytest.mark.timeout(60)
def test_tls_cluster_accepts_certs_and_refuses_others(tmp_path, procs):
    import dask
    from distributed import Client, Security

    certs = make_certs(tmp_path / "certs")
    other = make_certs(tmp_path / "other")  # a second, unrelated CA
    config = render_tls_template(certs, tmp_path / "dask-tls.yaml")
    sched_file = tmp_path / "scheduler.json"
    env = base_env()

    sched = procs.start(
        [DASK, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sched_file,
         "--tls-ca-file", certs / "ca.pem", "--tls-cert", certs / "node.pem",
         "--tls-key", certs / "node.key"],
        "scheduler", env=env,
    )
    address = wait_for_scheduler_file(sched_file, procs, sched)
    assert address.startswith("tls://127.0.0.1:")

    # worker 1: certificates on the command line (README); worker 2: from the
    # dask-tls.yaml template through DASK_CONFIG (no TLS flags at all)
    worker_args = ["--nworkers", "1", "--nthreads", "1", "--memory-limit", "1GiB",
                   "--host", "127.0.0.1", "--no-dashboard"]
    procs.start([DASK, "worker", address, *worker_args, "--name", "flags",
                 "--local-directory", tmp_path / "w1",
                 "--tls-ca-file", certs / "ca.pem", "--tls-cert", certs / "node.pem",
                 "--tls-key", certs / "node.key"], "worker-flags", env=env)
    procs.start([DASK, "worker", "--scheduler-file", sched_file, *worker_args,
                 "--name", "config", "--local-directory", tmp_path / "w2"],
                "worker-config", env=base_env(DASK_CONFIG=config))

    with Client(address, security=client_security(certs), timeout=15) as client:
        client.wait_for_workers(2, timeout=15)
        info = worker_info(client)
        assert sorted(w["name"] for w in info.values()) == ["config", "flags"]
        assert all(addr.startswith("tls://127.0.0.1:") for addr in info)
        assert all(w["nthreads"] == 1 for w in info.values())
        futures = [client.submit(sum, [1, 2], workers=[addr], pure=False) for addr in info]
        assert client.gather(futures) == [3, 3]

    # emdist's way: Security() defaults from the Dask config (the template's keys)
    with dask.config.set(flatten(yaml.safe_load(config.read_text()))):
        sec = Security()
    assert sec.require_encryption and sec.tls_client_cert == str(certs / "client.pem")
    with Client(address, security=sec, timeout=15) as client:
        assert client.submit(sum, [1, 2]).result() == 3

    # ... and from the environment variables the README documents
    code = ("from distributed import Client\n"
            f"with Client({address!r}, timeout=15) as c:\n"
            "    print(c.submit(sum, [1, 2]).result())\n")
    out = subprocess.run([sys.executable, "-c", code], env=base_env(**tls_env(certs)),
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr[-2000:]

    # refused, in bounded time: no certificates, plain tcp, a certificate of another CA
    wrong_ca = Security(tls_ca_file=str(certs / "ca.pem"),
                        tls_client_cert=str(other / "client.pem"),
                        tls_client_key=str(other / "client.key"), require_encryption=True)
    attempts = {
        "no certificates": dict(address=address),
        "plain tcp": dict(address=address.replace("tls://", "tcp://")),
        "other CA": dict(address=address, security=wrong_ca),
    }
    for what, kwargs in attempts.items():
        t0 = time.monotonic()
        with pytest.raises(Exception):  # noqa: B017 (TypeError, OSError, ... by case)
            client = Client(**kwargs, timeout=5)
            client.close()
        assert time.monotonic() - t0 < 15, what
    assert sched.poll() is None, procs.logs()


@needs_openssl
@pytest.mark.timeout(90)
def test_emdist_train_over_tls_with_dask_config(tmp_path, procs):
    """The README's TLS recipe with the real driver: DASK_CONFIG=dask-tls.yaml."""
    emdist = shutil.which("emdist", path=str(Path(sys.executable).parent))
    data = ROOT / "emdist" / "corpora" / "digits" / "train"
    if emdist is None or not (data / "feats.scp").exists():
        pytest.skip("emdist CLI or the bundled digits corpus not installed here")
    certs = make_certs(tmp_path / "certs")
    config = render_tls_template(certs, tmp_path / "dask-tls.yaml")
    sched_file = tmp_path / "scheduler.json"
    tls_flags = ["--tls-ca-file", certs / "ca.pem", "--tls-cert", certs / "node.pem",
                 "--tls-key", certs / "node.key"]
    sched = procs.start(
        [DASK, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", sched_file, *tls_flags],
        "scheduler", env=base_env())
    address = wait_for_scheduler_file(sched_file, procs, sched)
    procs.start([DASK, "worker", address, "--nworkers", "2", "--nthreads", "1",
                 "--memory-limit", "4GiB", "--host", "127.0.0.1",
                 "--local-directory", tmp_path / "w", *tls_flags],
                "worker", env=base_env())

    cmd = [emdist, "train", data, tmp_path / "exp", "--scheduler", address,
           "--wait-workers", "2", "--num-gauss", "2", "--num-iters", "1", "--nj", "2"]
    run = subprocess.run([str(c) for c in cmd], env=base_env(DASK_CONFIG=config),
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + procs.logs()
    assert (tmp_path / "exp" / "final.mdl").exists()

    t0 = time.monotonic()
    no_certs = [emdist, "train", data, tmp_path / "exp2", "--scheduler", address,
                "--wait-timeout", "5"]
    refused = subprocess.run([str(c) for c in no_certs],
                             env=base_env(), capture_output=True, text=True, timeout=40,
                             cwd=tmp_path)
    assert refused.returncode != 0
    assert time.monotonic() - t0 < 30


# -------------------------------------------------------- (ii) config files render


def test_yaml_files_load_and_say_what_the_readme_says():
    import distributed

    for path in [JOBQUEUE_YAML, COMPOSE, TLS_TEMPLATE]:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path

    # dask-tls.yaml: only keys that distributed knows
    with open(Path(distributed.__file__).parent / "distributed.yaml") as f:
        known = set(flatten(yaml.safe_load(f)))
    tls = flatten(yaml.safe_load(TLS_TEMPLATE.read_text()))
    assert set(tls) <= known, set(tls) - known
    assert tls["distributed.comm.require-encryption"] is True
    for role in ("scheduler", "worker", "client"):
        assert tls[f"distributed.comm.tls.{role}.cert"].startswith(TEMPLATE_TLS_DIR)
        assert tls[f"distributed.comm.tls.{role}.key"].endswith(".key")

    jq = yaml.safe_load(JOBQUEUE_YAML.read_text())["jobqueue"]
    assert set(jq) == {"slurm", "sge"}
    for system, cfg in jq.items():
        assert cfg["cores"] == cfg["processes"], system  # one thread per process
        assert cfg["worker-extra-args"] == ["--nthreads", "1"]
        assert cfg["scheduler-options"]["dashboard_address"].startswith("127.0.0.1:")
        assert any("bin/activate" in line for line in cfg["job-script-prologue"])
        assert "extra" not in cfg and "env-extra" not in cfg  # deprecated names

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"scheduler", "worker"}
    for svc in services.values():
        data = svc["volumes"][0]
        assert data["source"] == data["target"]  # same path in every container
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", []))
        assert svc["environment"]["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert services["scheduler"]["ports"] == ["127.0.0.1:8786:8786", "127.0.0.1:8787:8787"]
    cmd = services["worker"]["command"]
    assert cmd[cmd.index("--nthreads") + 1] == "1"
    assert cmd[2].startswith("tls://")


def _jobqueue_settings(system: str, **override) -> dict:
    cfg = yaml.safe_load(JOBQUEUE_YAML.read_text())["jobqueue"][system]
    cfg.update(override)
    return {f"jobqueue.{system}.{k}": v for k, v in cfg.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system", ["slurm", "sge"])
def test_jobqueue_job_scripts_render(system):
    pytest.importorskip("dask_jobqueue")
    import dask
    import dask_jobqueue

    cls = {"slurm": dask_jobqueue.SLURMCluster, "sge": dask_jobqueue.SGECluster}[system]
    with dask.config.set(_jobqueue_settings(system)):
        # no batch system is touched: the cluster starts only its local scheduler
        with cls(scheduler_options={"host": "127.0.0.1", "port": 0,
                                    "dashboard_address": "127.0.0.1:0"}) as cluster:
            script = cluster.job_script()
    print(script)
    assert re.findall(r"--nthreads (\S+)", script) == ["1", "1"]
    assert "--nworkers 8" in script
    assert "--local-directory ${TMPDIR:-/tmp}" in script
    assert f"source {TEMPLATE_VENV}/bin/activate" in script
    assert "--death-timeout 120" in script
    assert "tcp://127.0.0.1:" in script
    if system == "slurm":
        assert "#SBATCH --mem=32G" in script and "#SBATCH -t 04:00:00" in script
        assert "--memory-limit 3.50GiB" in script
    else:
        assert "#$ -pe smp 8" in script and "#$ -S /bin/bash" in script
        assert "#$ -l h_rt=04:00:00" in script and "--memory-limit 4.00GiB" in script


@pytest.mark.timeout(60)
def test_start_jobqueue_dry_run_and_thread_guard(tmp_path):
    pytest.importorskip("dask_jobqueue")
    launcher = CLUSTER / "start_jobqueue.py"
    args = ["--dry-run", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    for system in ("slurm", "sge"):
        out = subprocess.run([sys.executable, str(launcher), system, *args],
                             env=base_env(DASK_CONFIG=JOBQUEUE_YAML), capture_output=True,
                             text=True, timeout=40)
        assert out.returncode == 0, out.stderr[-3000:]
        assert re.findall(r"--nthreads (\S+)", out.stdout) == ["1", "1"]

    bad = yaml.safe_load(JOBQUEUE_YAML.read_text())
    bad["jobqueue"]["slurm"].update({"cores": 8, "processes": 4, "worker-extra-args": []})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, str(launcher), "slurm", *args],
                         env=base_env(DASK_CONFIG=tmp_path / "bad.yaml"),
                         capture_output=True, text=True, timeout=40)
    assert out.returncode != 0 and "--nthreads 1" in out.stderr


FAKE_SUBMIT = """\
    #!/bin/bash
    # fake {submit}: copy the job script (the caller deletes it), run it with bash
    # in its own session. FAKE_REJECT: refuse the job with that message (as the
    # batch system would, on stderr, status 1); FAKE_DIES: the job ends at once.
    if [ -n "${{FAKE_REJECT:-}}" ]; then
        printf '%b\\n' "$FAKE_REJECT" >&2
        exit 1
    fi
    script=$(mktemp "$FAKE_JOBS/job.XXXXXX")
    cp "${{@: -1}}" "$script"
    if [ -n "${{FAKE_DIES:-}}" ]; then echo "exit 1" > "$script"; fi
    setsid bash "$script" >> "$FAKE_JOBS/jobs.log" 2>&1 < /dev/null &
    echo "$!" >> "$FAKE_JOBS/pgids"
    echo "{message}"
"""
FAKE_CANCEL = """\
    #!/bin/bash
    # fake {cancel}: end the job's process group
    for id in "$@"; do kill -TERM -- "-$id" 2>/dev/null || true; done
"""
FAKE_STATUS = """\
    #!/bin/bash
    # fake {status}: the fake jobs whose process group is alive, in {status}'s columns;
    # FAKE_STATE sets their state, FAKE_REASON the error reason of `qstat -j ID`
    if [ "${{1:-}}" = -j ]; then
        echo "error reason    1:          ${{FAKE_REASON:-}}"
        exit 0
    fi
    [ -f "$FAKE_JOBS/pgids" ] || exit 0
    while read -r id; do
        if kill -0 -- "-$id" 2>/dev/null; then
            {line}
        fi
    done < "$FAKE_JOBS/pgids"
"""
FAKE_SYSTEMS = {
    "slurm": dict(submit="sbatch", cancel="scancel", status="squeue",
                  message="Submitted batch job $!",
                  line='echo "$id ${FAKE_STATE:-RUNNING}"'),
    "sge": dict(submit="qsub", cancel="qdel", status="qstat",
                message='Your job $! ("emdist-worker") has been submitted',
                line='echo "$id 0.50000 emdist-wor root ${FAKE_STATE:-r} 01/01/2026 00:00:00 '
                     'all.q@localhost 2"'),
}


def fake_batch_system(tmp_path: Path, system: str, **fake_env) -> tuple[dict, Path]:
    """sbatch/scancel/squeue or qsub/qdel/qstat faked by bash, first on PATH (before a
    real batch system that the host may have), and an environment for the launcher
    with them. Returns (env, dir of the fake jobs' pgids and log)."""
    fake = FAKE_SYSTEMS[system]
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_exe(fakebin / fake["submit"], FAKE_SUBMIT.format(**fake))
    write_exe(fakebin / fake["cancel"], FAKE_CANCEL.format(**fake))
    write_exe(fakebin / fake["status"], FAKE_STATUS.format(**fake))
    env = base_env(FAKE_JOBS=jobs, TMPDIR=tmp_path, **fake_env)
    env["PATH"] = f"{fakebin}{os.pathsep}{env['PATH']}"
    return env, jobs


def fake_jobqueue_config(tmp_path: Path, system: str) -> Path:
    confdir = tmp_path / "dask-config"
    confdir.mkdir()
    cfg = yaml.safe_load(JOBQUEUE_YAML.read_text())
    sys_cfg = cfg["jobqueue"][system]
    sys_cfg.update({"cores": 2, "processes": 2, "memory": "2GiB", "interface": "lo"})
    if system == "slurm":
        sys_cfg["job-mem"] = "2G"
    sys_cfg["job-script-prologue"] = [
        line.replace(TEMPLATE_VENV, str(VENV)) for line in sys_cfg["job-script-prologue"]]
    (confdir / "jobqueue.yaml").write_text(yaml.safe_dump(cfg))
    return confdir


def start_fake_launcher(procs, tmp_path, system, env, *extra):
    sched_file = tmp_path / "sched.json"
    launcher = procs.start(
        [sys.executable, CLUSTER / "start_jobqueue.py", system, "--scheduler-file",
         sched_file, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", *extra],
        "launcher", env=env, cwd=tmp_path,
    )
    return launcher, sched_file


def fake_pgids(jobs: Path) -> list[int]:
    path = jobs / "pgids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system,tls", [("slurm", False), ("sge", True)])
def test_start_jobqueue_runs_workers_from_rendered_job_script(tmp_path, procs, system, tls):
    """The launcher, with sbatch/qsub faked by bash: the rendered job script really
    starts one-thread workers that join, and SIGTERM cancels the jobs."""
    pytest.importorskip("dask_jobqueue")
    if tls and shutil.which("openssl") is None:
        pytest.skip("openssl missing")
    from distributed import Client

    confdir = fake_jobqueue_config(tmp_path, system)
    env, jobs = fake_batch_system(tmp_path, system, DASK_CONFIG=confdir)
    security = None
    if tls:
        certs = make_certs(tmp_path / "certs")
        render_tls_template(certs, confdir / "dask-tls.yaml")
        security = client_security(certs)

    launcher, sched_file = start_fake_launcher(procs, tmp_path, system, env, "--jobs", "1")
    address = wait_for_scheduler_file(sched_file, procs, launcher, timeout=30)
    assert address.startswith("tls://" if tls else "tcp://")
    try:
        with Client(scheduler_file=str(sched_file), security=security, timeout=15) as client:
            client.wait_for_workers(2, timeout=25)
            info = worker_info(client)
            assert [w["nthreads"] for w in info.values()] == [1, 1]
            assert all(w["memory_limit"] == 2**30 for w in info.values())
            assert all(a.startswith("tls://127.0.0.1:" if tls else "tcp://127.0.0.1:")
                       for a in info)
            assert client.submit(sum, [1, 2]).result() == 3
    finally:
        procs.extra_pgids += fake_pgids(jobs)
    assert len(procs.extra_pgids) == 1  # one job submitted

    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(20) == 0, procs.logs()
    assert "stopping: cancelling jobs" in procs.log("launcher")
    assert not sched_file.exists()  # removed with the scheduler
    deadline = time.monotonic() + 10
    while group_alive(procs.extra_pgids[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(procs.extra_pgids[0]), "job not cancelled"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system,reject,expected", [
    ("slurm", "sbatch: error: Batch job submission failed: Invalid account or "
     "account/partition combination specified",
     "sbatch exited with status 1: sbatch: error: Batch job submission failed: Invalid "
     "account or account/partition combination specified"),
    ("sge", r'Unable to run job: job rejected: the requested parallel environment "smp" '
     r"does not exist.\nExiting.",
     'qsub exited with status 1: Unable to run job: job rejected: the requested parallel '
     'environment "smp" does not exist.'),
])
def test_start_jobqueue_refused_submission_is_one_error_line(tmp_path, system, reject,
                                                             expected):
    """Once printed as 'submitted 1 jobs' with a tornado traceback in the log, the
    launcher staying up without workers: now exit status 1 and the batch system's own
    message on one line (the real systems: tests/test_batch_systems.py)."""
    pytest.importorskip("dask_jobqueue")
    confdir = fake_jobqueue_config(tmp_path, system)
    env, jobs = fake_batch_system(tmp_path, system, DASK_CONFIG=confdir, FAKE_REJECT=reject)
    out = subprocess.run(
        [sys.executable, str(CLUSTER / "start_jobqueue.py"), system, "--jobs", "2",
         "--scheduler-file", str(tmp_path / "sched.json"), "--host", "127.0.0.1",
         "--dashboard-address", "127.0.0.1:0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=40)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr
    assert out.stderr == ("start_jobqueue.py: error: one of 2 jobs was not submitted: "
                          f"{expected}\n")
    assert "submitted 2 jobs" not in out.stdout
    assert not (tmp_path / "sched.json").exists()
    assert fake_pgids(jobs) == []


@pytest.mark.timeout(60)
def test_start_jobqueue_replaces_a_job_that_ended(tmp_path, procs):
    """A job that ends while the launcher runs (scancel, walltime, a node lost) is
    replaced, and the new job's workers join."""
    pytest.importorskip("dask_jobqueue")
    from distributed import Client

    confdir = fake_jobqueue_config(tmp_path, "slurm")
    env, jobs = fake_batch_system(tmp_path, "slurm", DASK_CONFIG=confdir)
    launcher, sched_file = start_fake_launcher(procs, tmp_path, "slurm", env, "--poll", "0.5")
    wait_for_scheduler_file(sched_file, procs, launcher, timeout=30)
    try:
        with Client(scheduler_file=str(sched_file), timeout=15) as client:
            client.wait_for_workers(2, timeout=25)
            first = sorted(str(w["name"]) for w in worker_info(client).values())
            (pgid,) = fake_pgids(jobs)
            os.killpg(pgid, signal.SIGTERM)  # the job ends behind the launcher's back
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                names = sorted(str(w["name"]) for w in worker_info(client).values())
                if len(names) == 2 and not set(names) & set(first):
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"no new workers\n{procs.logs()}")
    finally:
        procs.extra_pgids += fake_pgids(jobs)
    old, new = fake_pgids(jobs)
    assert re.search(rf"^job {old} \(SLURMCluster-0\) has ended; submitted job {new} "
                     r"\(SLURMCluster-1\) in its place$", procs.log("launcher"), re.M)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(20) == 0, procs.logs()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["jobs-die", "sge-error-state"])
def test_start_jobqueue_gives_up_on_jobs_that_cannot_run(tmp_path, procs, case):
    """Jobs that end before any worker connected are replaced at most
    MAX_FAILED_STARTS times in a row; an SGE job in error state (Eqw) is not waited for.
    Either way: exit status 1 and one error line."""
    pytest.importorskip("dask_jobqueue")
    system = "slurm" if case == "jobs-die" else "sge"
    fake = {"FAKE_DIES": "1"} if case == "jobs-die" else {
        "FAKE_STATE": "Eqw", "FAKE_REASON": "can't chdir to /gone: No such file or directory"}
    confdir = fake_jobqueue_config(tmp_path, system)
    env, jobs = fake_batch_system(tmp_path, system, DASK_CONFIG=confdir, **fake)
    launcher, sched_file = start_fake_launcher(procs, tmp_path, system, env, "--poll", "0.3")
    try:
        rc = launcher.wait(30)
    finally:
        procs.extra_pgids += fake_pgids(jobs)
    errors = [line for line in procs.log("launcher").splitlines() if "error" in line.lower()]
    assert rc == 1 and len(errors) == 1, procs.logs()
    assert "Traceback" not in procs.log("launcher")
    pgids = fake_pgids(jobs)
    if case == "jobs-die":
        assert len(pgids) == 3
        assert errors[0] == (
            f"start_jobqueue.py: error: job {pgids[-1]} (SLURMCluster-2) has ended; 3 jobs in "
            "a row ended before any of their workers connected: see the output of job "
            f"{pgids[-1]}")
    else:
        assert len(pgids) == 1
        assert errors[0] == (
            f"start_jobqueue.py: error: job {pgids[0]} is in error state (Eqw): can't chdir "
            "to /gone: No such file or directory")
    assert not sched_file.exists()


# ------------------------------------------------- batch scripts, with fake SLURM/SGE


FAKE_SRUN = """\
    #!/bin/bash
    # fake srun: one copy of the command per task, SLURM_PROCID set; TERM ends them
    while [[ $1 == -* ]]; do shift; done
    pids=()
    for ((i = 0; i < SLURM_NTASKS; i++)); do
        SLURM_PROCID=$i "$@" &
        pids+=($!)
    done
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
    wait
"""

FAKE_EMDIST = """\
    #!{python}
    # fake emdist driver: record the arguments, attach like emdist does, run a task
    import json, sys
    from distributed import Client
    args = sys.argv[1:]
    opts = dict(zip(args[1::2], args[2::2]))
    with open({record!r}, "w") as f:
        json.dump(args, f)
    with Client(scheduler_file=opts["--scheduler-file"], timeout=15) as c:
        c.wait_for_workers(int(opts["--wait-workers"]), timeout=25)
        info = c.scheduler_info(n_workers=-1)["workers"]
        result = dict(
            result=c.submit(sum, [1, 2]).result(),
            nthreads=[w["nthreads"] for w in info.values()],
            memory=[w["memory_limit"] for w in info.values()],
            names=sorted(str(w["name"]) for w in info.values()),
            addresses=sorted(info),
        )
    with open({record!r} + ".result", "w") as f:
        json.dump(result, f)
"""


@pytest.mark.timeout(60)
def test_sbatch_script_with_fake_srun(tmp_path, procs):
    tls = shutil.which("openssl") is not None
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    record = tmp_path / "emdist-args.json"
    write_exe(fakebin / "srun", FAKE_SRUN)
    write_exe(fakebin / "emdist", FAKE_EMDIST.format(python=sys.executable, record=str(record)))
    fakevenv = tmp_path / "venv"
    (fakevenv / "bin").mkdir(parents=True)
    (fakevenv / "bin" / "activate").write_text(
        f'export PATH="{fakebin}:{VENV / "bin"}:$PATH"\n')
    env = base_env(
        SLURM_JOB_ID=4242, SLURM_NTASKS=3, SLURM_MEM_PER_CPU=1024,
        SLURM_SUBMIT_DIR=tmp_path, TMPDIR=tmp_path, EMDIST_VENV=fakevenv,
        EMDIST_DASK_INTERFACE="lo",
    )
    if tls:
        env["EMDIST_TLS_DIR"] = str(make_certs(tmp_path / "certs"))
    job = procs.start(["bash", SBATCH, "train", "/data/train", "/exp/ubm", "--nj", "4"],
                      "sbatch", env=env, cwd=tmp_path)
    try:
        rc = job.wait(45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"batch script did not finish\n{procs.logs()}")
    assert rc == 0, procs.logs()

    sched_file = tmp_path / "dask-scheduler-4242.json"
    assert json.loads(record.read_text()) == [
        "train", "--scheduler-file", str(sched_file), "--wait-workers", "2",
        "--wait-timeout", "300", "/data/train", "/exp/ubm", "--nj", "4"]
    result = json.loads(Path(str(record) + ".result").read_text())
    assert result["result"] == 3
    assert result["nthreads"] == [1, 1]
    assert result["memory"] == [921 * 2**20] * 2  # 90 % of --mem-per-cpu=1024M
    assert result["names"] == ["4242-1", "4242-2"]
    scheme = "tls://127.0.0.1:" if tls else "tcp://127.0.0.1:"
    assert all(a.startswith(scheme) for a in result["addresses"])
    assert "emdist train exited with status 0" in procs.log("sbatch")


@pytest.mark.timeout(60)
def test_qsub_array_task_workers(tmp_path, procs):
    from distributed import Client

    tls = shutil.which("openssl") is not None
    sched_file = tmp_path / "sched.json"
    sched_cmd = [DASK, "scheduler", "--scheduler-file", sched_file, "--host", "127.0.0.1",
                 "--port", "0", "--dashboard-address", "127.0.0.1:0"]
    security = None
    env = base_env(EMDIST_VENV=VENV, EMDIST_DASK_INTERFACE="lo",
                   EMDIST_WORKER_MEMORY="1GiB", JOB_ID=77, NSLOTS=1, TMPDIR=tmp_path)
    if tls:
        certs = make_certs(tmp_path / "certs")
        sched_cmd += ["--protocol", "tls", "--tls-ca-file", certs / "ca.pem",
                      "--tls-cert", certs / "node.pem", "--tls-key", certs / "node.key"]
        env["EMDIST_TLS_DIR"] = str(certs)
        security = client_security(certs)
    sched = procs.start(sched_cmd, "scheduler", env=base_env())
    for task in (1, 2):
        procs.start(["bash", QSUB, sched_file], f"task{task}",
                    env={**env, "SGE_TASK_ID": str(task)}, cwd=tmp_path)
    address = wait_for_scheduler_file(sched_file, procs, sched)
    with Client(address, security=security, timeout=15) as client:
        try:
            client.wait_for_workers(2, timeout=25)
        except TimeoutError:
            pytest.fail(procs.logs())
        info = worker_info(client)
        assert sorted(w["name"] for w in info.values()) == ["sge-77-1", "sge-77-2"]
        assert [w["nthreads"] for w in info.values()] == [1, 1]
        assert all(w["memory_limit"] == 2**30 for w in info.values())
        assert client.submit(sum, [1, 2]).result() == 3

    usage = subprocess.run(["bash", str(QSUB)], capture_output=True, env=env, timeout=10)
    assert usage.returncode == 2 and b"usage" in usage.stderr


# ----------------------------------------------------------------- (iii) shell syntax


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    out = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout
