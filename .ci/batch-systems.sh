#!/usr/bin/env bash
# shellcheck disable=SC2317  # the *_ready functions run through wait_for
# Install and start single-node SLURM (22.05) and Grid Engine (8.1.9) from Debian's
# packages, as root, for tests/test_batch_systems.py (the set-up of
# ../shared/notes/batch-systems.md, made idempotent and quick to re-run).
#
#   bash .ci/batch-systems.sh [slurm] [sge]      # default: both
#
# A second run installs nothing and starts only what is not running (about a second).
# Exit status 0 when every system asked for is up and has run a job; otherwise each
# system that is not up gets one line "batch-systems: <system>: not available: <why>"
# on stderr and the status is 1. CI goes on either way: the real-system tests then
# skip, naming the reason. EMDIST_BATCH_SYSTEMS=none skips everything (status 1).
#
# What it leaves running: munged, slurmctld, slurmd; sge_qmaster, sge_execd. SLURM has
# partition "debug" (default) on this host; Grid Engine has queue all.q (8 slots, no load
# thresholds, parallel environment "smp") and a 1 s scheduling interval, so a job starts
# within about 2 s instead of 15.
set -uo pipefail

# apt-get gets this many seconds in all (CI must stay within 10 minutes); a system whose
# packages are not in by then is not available
APT_BUDGET=${APT_BUDGET:-240}
START_TIMEOUT=${START_TIMEOUT:-60}
export DEBIAN_FRONTEND=noninteractive
export SGE_ROOT=${SGE_ROOT:-/var/lib/gridengine} SGE_CELL=${SGE_CELL:-default}

t_start=$SECONDS
say() { echo "batch-systems: $*"; }
fail() {  # fail SYSTEM REASON: one line naming why, then the caller returns 1
    echo "batch-systems: $1: not available: $2" >&2
    return 1
}
elapsed() { echo "$((SECONDS - $1)) s"; }

# wait_for SECONDS COMMAND...: until COMMAND succeeds (quietly), at most SECONDS
wait_for() {
    local limit=$1 t0=$SECONDS
    shift
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -ge "$limit" ] && return 1
        sleep 0.5
    done
}

installed() {  # installed PKG...: all of them are installed
    local p
    for p in "$@"; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || return 1
    done
}

apt_reason() {  # the line of apt's output that says why: no network first, else an error
    grep -m1 -E 'Temporary failure|Could not resolve|Could not connect|Failed to fetch' <<<"$1" \
        || grep -m1 -E '^E:' <<<"$1" || tail -n1 <<<"$1"
}

apt_updated=0
apt_failed=""
apt_deadline=$((SECONDS + APT_BUDGET))
apt_run() {  # apt_run ARGS...: apt-get within what is left of APT_BUDGET; its output in $out
    local left=$((apt_deadline - SECONDS)) rc
    if [ "$left" -le 0 ]; then
        out="apt-get has had its ${APT_BUDGET} s (APT_BUDGET)"
        return 1
    fi
    out=$(timeout "$left" apt-get "$@" 2>&1)
    rc=$?
    [ "$rc" = 124 ] && out="apt-get $1 did not finish within the ${APT_BUDGET} s of APT_BUDGET"
    return "$rc"
}

install_packages() {  # install_packages SYSTEM PKG...
    local system=$1 t0=$SECONDS out
    shift
    installed "$@" && return 0
    if [ -n "$apt_failed" ]; then  # no second try at what failed for the first system
        fail "$system" "$apt_failed"
        return 1
    fi
    if [ "$apt_updated" = 0 ]; then
        if ! apt_run update -qq; then
            apt_failed="apt-get update failed: $(apt_reason "$out")"
            fail "$system" "$apt_failed"
            return 1
        fi
        apt_updated=1
    fi
    if ! apt_run install -y -qq --no-install-recommends "$@"; then
        fail "$system" "apt-get install $* failed: $(apt_reason "$out")"
        return 1
    fi
    say "$system: installed $* in $(elapsed "$t0")"
}

pid_alive() {  # pid_alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# -------------------------------------------------------------------------- SLURM

slurm_conf() {
    local h=$1 mem
    # 90 % of the RAM: slurmd drains a node that has less than RealMemory
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat <<EOF
# written by emdist's .ci/batch-systems.sh: one node, root runs everything
ClusterName=emdist
SlurmctldHost=$h
ProctrackType=proctrack/linuxproc
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmUser=root
SlurmdUser=root
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AuthType=auth/munge
MpiDefault=none
KillWait=5
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$h CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$h Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

slurm_node_ready() {
    local state
    state=$(sinfo -h -n "$1" -o %t 2>/dev/null | head -n1)
    case $state in idle|mix|alloc) return 0 ;; *) return 1 ;; esac
}

setup_slurm() {
    local t0=$SECONDS h conf restart=0 out
    install_packages slurm slurmctld slurmd slurm-client munge || return 1
    h=$(hostname -s)
    mkdir -p /var/lib/slurm/slurmd /var/lib/slurm/slurmctld /var/log/slurm /run/munge /etc/slurm
    conf=$(slurm_conf "$h")
    if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
        printf '%s\n' "$conf" >/etc/slurm/slurm.conf
        restart=1
    fi

    # munge: the package makes a key; make one if it did not
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chmod 400 /etc/munge/munge.key
    fi
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
        if ! out=$(su -s /bin/sh munge -c munged 2>&1); then
            fail slurm "munged did not start: $(tail -n1 <<<"$out")"
            return 1
        fi
        wait_for 10 sh -c 'munge -n </dev/null | unmunge' \
            || { fail slurm "munge does not answer after 10 s"; return 1; }
    fi

    # a changed slurm.conf: restart the daemons this script started (by their pid files)
    if [ "$restart" = 1 ]; then
        local f
        for f in /run/slurmd.pid /run/slurmctld.pid; do
            if pid_alive "$f"; then
                kill "$(cat "$f")"
                wait_for 10 sh -c "! kill -0 $(cat "$f") 2>/dev/null"
            fi
        done
    fi
    if ! pid_alive /run/slurmctld.pid; then
        out=$(slurmctld 2>&1) || { fail slurm "slurmctld did not start: $(tail -n1 <<<"$out")"; return 1; }
    fi
    if ! pid_alive /run/slurmd.pid; then
        out=$(slurmd 2>&1) || { fail slurm "slurmd did not start: $(tail -n1 <<<"$out")"; return 1; }
    fi
    if ! wait_for "$START_TIMEOUT" scontrol ping; then
        fail slurm "slurmctld does not answer after ${START_TIMEOUT} s (see /var/log/slurm/slurmctld.log)"
        return 1
    fi
    if ! wait_for "$START_TIMEOUT" slurm_node_ready "$h"; then
        # a node left down or drained by an earlier run
        scontrol update nodename="$h" state=resume >/dev/null 2>&1 || true
        if ! wait_for 15 slurm_node_ready "$h"; then
            fail slurm "node $h is $(sinfo -h -n "$h" -o %t 2>/dev/null), not idle (see /var/log/slurm/slurmd.log)"
            return 1
        fi
    fi
    if ! out=$(timeout 30 srun -N1 -n1 -t 1 true 2>&1); then
        fail slurm "srun true failed: $(tail -n1 <<<"$out")"
        return 1
    fi
    say "slurm: up ($(sinfo -h -o '%P %t %c CPUs %m MB' | head -n1)) in $(elapsed "$t0")"
}

# -------------------------------------------------------------------------- Grid Engine

sge_ready() {  # queue instance all.q@HOST is listed, with no states (u, a, d, E, ...)
    qstat -f -q "all.q@$1" 2>/dev/null | awk -v q="all.q@$1" '
        $1 == q {found = 1; if (NF > 5) bad = 1}
        END {exit !(found && !bad)}'
}

setup_sge() {
    local t0=$SECONDS h tmp out q
    h=$(hostname)
    if ! installed gridengine-master gridengine-exec gridengine-client; then
        for q in "gridengine-common shared/gridenginemaster string $h" \
                 "gridengine-common shared/gridenginecell string default" \
                 "gridengine-common shared/gridengineconfig boolean true" \
                 "gridengine-client shared/gridenginemaster string $h"; do
            echo "$q" | debconf-set-selections
        done
        install_packages sge gridengine-master gridengine-exec gridengine-client || return 1
    fi
    local common=$SGE_ROOT/$SGE_CELL/common
    [ -d "$common" ] || { fail sge "no cell at $common after installing"; return 1; }
    # Where this host's name resolves to 127.0.0.1, whose name is "localhost", qmaster
    # refuses its own clients ("client IP resolved to host name localhost"): alias them.
    if [ "$(getent hosts 127.0.0.1 | awk '{print $2}')" != "$h" ] \
            && getent hosts "$h" | grep -q '^127\.'; then
        grep -qx "$h localhost" "$common/host_aliases" 2>/dev/null \
            || echo "$h localhost" >>"$common/host_aliases"
    fi
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN

    if ! qstat >/dev/null 2>&1; then
        out=$(sge_qmaster 2>&1) || { fail sge "sge_qmaster did not start: $(tail -n1 <<<"$out")"; return 1; }
        wait_for "$START_TIMEOUT" qstat \
            || { fail sge "qmaster does not answer after ${START_TIMEOUT} s: $(qstat 2>&1 | tail -n1)"; return 1; }
    fi
    qconf -ss 2>/dev/null | grep -qx "$h" || qconf -as "$h" >/dev/null 2>&1
    if ! qconf -sel 2>/dev/null | grep -qx "$h"; then
        printf '%s\n' "hostname $h" "load_scaling NONE" "complex_values NONE" \
            "user_lists NONE" "xuser_lists NONE" "projects NONE" "xprojects NONE" \
            "usage_scaling NONE" "report_variables NONE" >"$tmp/exec"
        out=$(qconf -Ae "$tmp/exec" 2>&1) || { fail sge "qconf -Ae: $out"; return 1; }
    fi
    # The global configuration: root may submit (min_uid, min_gid 0); jobs start no
    # login shell (login_shells NONE): a login bash runs ~/.bash_profile, where a job
    # cancelled at the wrong moment can leave a lock behind (pyenv's rehash lock made
    # every later shell wait 60 s). The file's name must be the config's name.
    mkdir -p "$tmp/gc"
    qconf -sconf global >"$tmp/global.now"
    sed 's/^min_uid .*/min_uid 0/; s/^min_gid .*/min_gid 0/;
         s/^login_shells .*/login_shells NONE/' "$tmp/global.now" >"$tmp/gc/global"
    local execd_restart=0
    if ! awk '{$1 = $1} 1' "$tmp/global.now" | cmp -s - <(awk '{$1 = $1} 1' "$tmp/gc/global"); then
        out=$(qconf -Mconf "$tmp/gc/global" 2>&1) || { fail sge "qconf -Mconf: $out"; return 1; }
        execd_restart=1  # sge_execd reads the configuration when it starts
    fi
    # schedule every second, and at once after a submission or a job's end
    qconf -ssconf >"$tmp/sconf"
    sed -i 's/^schedule_interval .*/schedule_interval 0:0:1/;
            s/^flush_submit_sec .*/flush_submit_sec 1/;
            s/^flush_finish_sec .*/flush_finish_sec 1/' "$tmp/sconf"
    if ! qconf -ssconf | awk '{$1 = $1} 1' | cmp -s - <(awk '{$1 = $1} 1' "$tmp/sconf"); then
        out=$(qconf -Msconf "$tmp/sconf" 2>&1) || { fail sge "qconf -Msconf: $out"; return 1; }
    fi
    if ! qconf -spl 2>/dev/null | grep -qx smp; then
        printf '%s\n' "pe_name smp" "slots 8" "user_lists NONE" "xuser_lists NONE" \
            "start_proc_args NONE" "stop_proc_args NONE" "allocation_rule \$pe_slots" \
            "control_slaves FALSE" "job_is_first_task TRUE" "urgency_slots min" \
            "accounting_summary FALSE" "qsort_args NONE" >"$tmp/pe"
        out=$(qconf -Ap "$tmp/pe" 2>&1) || { fail sge "qconf -Ap: $out"; return 1; }
    fi
    # queue all.q: 8 slots on this host (more than cores, so that two test runs at once do
    # not queue behind each other), no load thresholds (a busy 2-core runner would
    # put the queue in alarm state), pe smp, bash
    local have_q=0
    if qconf -sql 2>/dev/null | grep -qx all.q; then
        have_q=1
        qconf -sq all.q >"$tmp/q.template"
    else
        qconf -sq >"$tmp/q.template" 2>/dev/null
    fi
    awk -v h="$h" '
        $1 == "qname" {print "qname all.q"; next}
        $1 == "hostlist" {print "hostlist " h; next}
        $1 == "slots" {print "slots 8"; next}
        $1 == "pe_list" {print "pe_list make smp"; next}
        $1 == "shell" {print "shell /bin/bash"; next}
        $1 == "load_thresholds" {print "load_thresholds NONE"; next}
        {print}' "$tmp/q.template" >"$tmp/all.q"
    if [ "$have_q" = 0 ]; then
        out=$(qconf -Aq "$tmp/all.q" 2>&1) || { fail sge "qconf -Aq: $out"; return 1; }
    elif ! awk '{$1 = $1} 1' "$tmp/q.template" | cmp -s - <(awk '{$1 = $1} 1' "$tmp/all.q"); then
        out=$(qconf -Mq "$tmp/all.q" 2>&1) || { fail sge "qconf -Mq: $out"; return 1; }
    fi
    if [ "$execd_restart" = 1 ] && pgrep -x sge_execd >/dev/null; then
        qconf -ke "$h" >/dev/null 2>&1
        wait_for 20 sh -c '! pgrep -x sge_execd' \
            || { fail sge "sge_execd did not stop for a restart (qconf -ke $h)"; return 1; }
    fi
    if ! pgrep -x sge_execd >/dev/null; then
        out=$(sge_execd 2>&1) || { fail sge "sge_execd did not start: $(tail -n1 <<<"$out")"; return 1; }
    fi
    if ! wait_for "$START_TIMEOUT" sge_ready "$h"; then
        fail sge "queue all.q@$h is not usable after ${START_TIMEOUT} s: $(qstat -f 2>&1 | grep "all.q@" | head -n1)"
        return 1
    fi
    # smoke test: a job runs
    out=$(cd "$tmp" && echo true | timeout 60 qsub -terse -sync y -o /dev/null -j y 2>&1) \
        || { fail sge "a test job did not run: $(tail -n1 <<<"$out")"; return 1; }
    say "sge: up (queue all.q@$h) in $(elapsed "$t0")"
}

# -------------------------------------------------------------------------- main

systems=("$@")
[ ${#systems[@]} -eq 0 ] && systems=(slurm sge)
if [ "${EMDIST_BATCH_SYSTEMS:-}" = none ]; then
    for s in "${systems[@]}"; do fail "$s" "EMDIST_BATCH_SYSTEMS=none"; done
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    for s in "${systems[@]}"; do fail "$s" "needs root to install and start it"; done
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    for s in "${systems[@]}"; do fail "$s" "no apt-get (the set-up is for Debian)"; done
    exit 1
fi
status=0
for s in "${systems[@]}"; do
    case $s in
        slurm) setup_slurm || status=1 ;;
        sge) setup_sge || status=1 ;;
        *) echo "usage: $0 [slurm] [sge]" >&2; exit 2 ;;
    esac
done
say "done in $(elapsed "$t_start")"
exit "$status"
