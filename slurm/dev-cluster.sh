#!/usr/bin/env bash
# Development SLURM cluster (with accounting) for tldist tests: one node, or N nodes each in its own
# network namespace (own IP on a private bridge, own hostname and /etc/hosts).
#
#   slurm/dev-cluster.sh start   [STATE_DIR]   install if needed, start, wait until idle
#   slurm/dev-cluster.sh stop    [STATE_DIR]   stop daemons (idempotent)
#   slurm/dev-cluster.sh restart [STATE_DIR]   stop + start
#   slurm/dev-cluster.sh status  [STATE_DIR]   sinfo/squeue; exit 0 iff the cluster answers
#   slurm/dev-cluster.sh env     [STATE_DIR]   print the export line only
#
# Multi-node (TLDIST_SLURM_NODES=N, N >= 2; `stop`/`status` read N back from STATE_DIR):
#   TLDIST_SLURM_NODES=2 slurm/dev-cluster.sh start [STATE_DIR]
#   slurm/dev-cluster.sh node K CMD...        run CMD on node K (its netns, hostname, hosts file)
#   slurm/dev-cluster.sh link K down|up       cut / restore node K's link to the bridge
#   slurm/dev-cluster.sh slurmd K kill|start  SIGKILL node K's slurmd / start it again
#   slurm/dev-cluster.sh reset K              end every process on node K but its slurmd (what a
#                                             reboot leaves); do it before `resume` after a fault
#   slurm/dev-cluster.sh resume K             scontrol update nodename=<node K> state=resume
#   slurm/dev-cluster.sh nodes                print "name ip namespace host-veth" per node
# (these helpers take STATE_DIR from $TLDIST_SLURM_STATE_DIR only.)  Node K is named nodeK, has
# address $TLDIST_SLURM_SUBNET.(10+K) on a bridge holding $TLDIST_SLURM_SUBNET.1 (the controller),
# no default route and an empty resolv.conf: nothing leaves that /24.  `stop` removes every
# namespace, veth and the bridge it made; the real /etc/hosts is never touched.
#
# STATE_DIR defaults to $TLDIST_SLURM_STATE_DIR, else /tmp/tldist-slurm (one node) or
# /tmp/tldist-slurm-<N>nodes.
# After `start`, run the printed `export SLURM_CONF=...` (or: eval "$(slurm/dev-cluster.sh env)").
#
# Everything lives under STATE_DIR: slurm.conf, slurmdbd.conf, munge key/socket, a private
# MariaDB (127.0.0.1, own port/datadir), spool/state dirs, logs and pid files.  No systemd, no
# cgroups.  Needs root (re-execs itself with `sudo -n` when possible).
#
# Environment knobs:
#   TLDIST_SLURM_CPUS=8            CPUs advertised for the node (config_overrides)
#   TLDIST_SLURM_PORT_BASE=N       first of 4 TCP ports (ctld, slurmd, dbd, mariadb)
#   TLDIST_SLURM_START_TIMEOUT=60  seconds to wait for each readiness check
#   TLDIST_SLURM_FRESH=1           on start, also wipe the accounting database
#   TLDIST_SLURM_NODES=1           compute nodes; >= 2 puts each in its own network namespace
#   TLDIST_SLURM_SUBNET=10.213.7   private /24 of the multi-node bridge (first three octets)
#   TLDIST_SLURM_SLURMD_TIMEOUT=6  multi-node: SlurmdTimeout (MessageTimeout=3): a dead node goes
#                                  DOWN (and its jobs requeue) ~10 s after the fault
#
# Exit codes: 0 ok, 1 failure, 2 usage, 3 cannot get root, 4 packages missing and no apt-get,
# 5 no network namespaces/bridges here (the test fixture skips on 3, 4 and 5 unless CI=true).
set -euo pipefail

PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
CLUSTER=tldist
PARTITION=debug
CMD=${1:-}
NODES=${TLDIST_SLURM_NODES:-1}
TIMEOUT=${TLDIST_SLURM_START_TIMEOUT:-60}

log() { printf '[dev-cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $NODES =~ ^[1-9][0-9]?$ ]] || { log "TLDIST_SLURM_NODES=$NODES is not a node count (1-99)"; exit 2; }
HELPER_ARGS=()
case "$CMD" in
  start|stop|restart|status|env)
    if ((NODES > 1)); then STATE=${2:-${TLDIST_SLURM_STATE_DIR:-/tmp/tldist-slurm-${NODES}nodes}}
    else STATE=${2:-${TLDIST_SLURM_STATE_DIR:-/tmp/tldist-slurm}}; fi ;;
  node|link|slurmd|resume|nodes|reset)
    STATE=${TLDIST_SLURM_STATE_DIR:-/tmp/tldist-slurm-${NODES}nodes}
    HELPER_ARGS=("${@:2}") ;;
  *) usage ;;
esac
# stop/status/helpers of a running multi-node cluster: its node count is recorded in the state dir
if [[ $CMD != start && $CMD != restart && -s $STATE/nodes.env ]]; then
  NODES=$(sed -n 's/^NODES=//p' "$STATE/nodes.env")
fi
if ((NODES > 1)); then CPUS=${TLDIST_SLURM_CPUS:-4}; PKGS+=(iproute2); else CPUS=${TLDIST_SLURM_CPUS:-8}; fi

# ---------------------------------------------------------------- privileges
if [[ $EUID -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n --preserve-env=TLDIST_SLURM_CPUS,TLDIST_SLURM_PORT_BASE,TLDIST_SLURM_START_TIMEOUT,TLDIST_SLURM_FRESH,TLDIST_SLURM_NODES,TLDIST_SLURM_SUBNET,TLDIST_SLURM_SLURMD_TIMEOUT,TLDIST_SLURM_STATE_DIR \
      bash "$0" "$CMD" "${HELPER_ARGS[@]:-$STATE}"
  fi
  if [[ $CMD == status || $CMD == env || $CMD == nodes ]] && [[ -f $STATE/slurm.conf ]]; then
    :  # read-only commands work without root
  else
    log "needs root (or passwordless sudo) to install/run SLURM daemons; uid=$EUID"
    exit 3
  fi
fi

mkdir -p "$STATE" 2>/dev/null || true
STATE=$(cd "$STATE" && pwd -P)
CONF=$STATE/slurm.conf
DBDCONF=$STATE/slurmdbd.conf
MUNGE_SOCK=$STATE/munge/munge.socket
DB_SOCK=$STATE/mysql/mysqld.sock
export SLURM_CONF=$CONF

# daemon name -> pid file
pidfile() { echo "$STATE/run/$1.pid"; }
if ((NODES > 1)); then DAEMONS_STOP_ORDER=(slurmctld slurmdbd mariadbd munged)  # + one slurmd per node
else DAEMONS_STOP_ORDER=(slurmd slurmctld slurmdbd mariadbd munged); fi

# ---------------------------------------------------------------- multi-node network
# Names are derived from the state dir, so two clusters (different state dirs) never share a
# bridge, veth or namespace.  Interface names stay <= 15 characters.
SUBNET=${TLDIST_SLURM_SUBNET:-10.213.7}
NETP=tl$(printf '%s' "$STATE" | cksum | cut -d' ' -f1 | xargs printf '%06x' | tail -c 6)
if [[ -s $STATE/nodes.env && $CMD != start && $CMD != restart ]]; then
  SUBNET=$(sed -n 's/^SUBNET=//p' "$STATE/nodes.env")
  NETP=$(sed -n 's/^NETP=//p' "$STATE/nodes.env")
fi
BRIDGE=$NETP-br
CTL_IP=$SUBNET.1
node_host() { echo "node$1"; }
node_ip() { echo "$SUBNET.$((10 + $1))"; }
node_ns() { echo "$NETP-node$1"; }
node_veth() { echo "$NETP-v$1"; }

# ---------------------------------------------------------------- process helpers
# Is PID alive (not gone, not a zombie), with the expected comm, and does it belong to this
# STATE dir (cmdline or environment mentions it)?  Trap: killed daemons linger as zombies and
# pid files can be stale / pids recycled.
pid_is_ours() {
  local pid=$1 name=$2 st comm
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  st=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  # field 3 (state) follows the ")" that closes comm
  st=${st##*) }; st=${st%% *}
  [[ $st == Z || $st == X ]] && return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$name" ]] || return 1
  if tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$STATE"; then return 0; fi
  if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qF "$STATE"; then return 0; fi
  return 1
}

daemon_pid() {  # prints the pid if the daemon is running and ours
  local f pid
  f=$(pidfile "$1")
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  pid_is_ours "$pid" "$1" || return 1
  echo "$pid"
}

stop_daemon() {
  local name=$1 pid i
  if ! pid=$(daemon_pid "$name"); then rm -f "$(pidfile "$name")"; return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    pid_is_ours "$pid" "$name" || break
    sleep 0.1
  done
  if pid_is_ours "$pid" "$name"; then
    log "$name ($pid) ignored SIGTERM for 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.3
  fi
  rm -f "$(pidfile "$name")"
}

# Spawn a non-daemonizing program in its own session, stdio detached, pid recorded.
spawn() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 9>&- &
  echo $! >"$(pidfile "$name")"
}

dump_logs() {
  local f
  for f in "$STATE"/log/*; do
    [[ -f $f ]] || continue
    printf -- '----- tail %s -----\n' "$f" >&2
    tail -n 25 "$f" >&2 || true
  done
}

daemon_died() {  # pid file written (daemons write it after forking) but process gone
  local f pid
  f=$(pidfile "$1")
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [[ -n $pid ]] || return 1
  ! pid_is_ours "$pid" "$1"
}

wait_for() {  # wait_for DESCRIPTION DAEMON|- COMMAND...   (fails fast if DAEMON dies)
  local what=$1 daemon=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT)) out
  until out=$("$@" 2>&1); do
    if [[ $daemon != - ]] && daemon_died "$daemon"; then
      log "$daemon exited while waiting for: $what"
      dump_logs
      die "cluster did not come up ($what): $out"
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${TIMEOUT}s waiting for: $what"
      dump_logs
      die "cluster did not come up ($what): $out"
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- install
installed() {
  local p
  for p in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || return 1
  done
}

install_packages() {
  installed && return 0
  command -v apt-get >/dev/null || { log "packages missing (${PKGS[*]}) and no apt-get"; exit 4; }
  log "installing ${PKGS[*]} ..."
  local t0=$SECONDS policy=/usr/sbin/policy-rc.d own_policy=0
  # Keep package maintainer scripts from starting system-wide munge/mariadb/slurm services.
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1
  fi
  # shellcheck disable=SC2064
  trap "[[ $own_policy == 1 ]] && rm -f $policy" EXIT
  export DEBIAN_FRONTEND=noninteractive
  local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null \
     || ! apt-get install "${apt_opts[@]}" "${PKGS[@]}" >"$STATE/log/apt.log" 2>&1; then
    apt-get update -q >>"$STATE/log/apt.log" 2>&1 || { tail -n 30 "$STATE/log/apt.log" >&2; die "apt-get update failed"; }
    apt-get install "${apt_opts[@]}" "${PKGS[@]}" >>"$STATE/log/apt.log" 2>&1 \
      || { tail -n 30 "$STATE/log/apt.log" >&2; die "apt-get install failed (log: $STATE/log/apt.log)"; }
  fi
  [[ $own_policy == 1 ]] && rm -f "$policy"
  trap - EXIT
  log "installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- config
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

choose_ports() {
  local base i p busy
  if [[ -n ${TLDIST_SLURM_PORT_BASE:-} ]]; then
    base=$TLDIST_SLURM_PORT_BASE
  else  # stable per state dir, in 10000-19999 (below the job MASTER_PORT range 20000-39999)
    base=$((10000 + ($(printf '%s' "$STATE" | cksum | cut -d' ' -f1) % 1990) * 5))
  fi
  for ((i = 0; i < 50; i++)); do
    busy=0
    for p in $base $((base + 1)) $((base + 2)) $((base + 3)); do port_busy "$p" && busy=1; done
    ((busy == 0)) && break
    base=$((base + 5)); ((base > 19990)) && base=10000
  done
  ((busy == 0)) || die "no free port block found"
  CTLD_PORT=$base SLURMD_PORT=$((base + 1)) DBD_PORT=$((base + 2)) DB_PORT=$((base + 3))
}

next_first_job_id() {
  # Fresh job-id block per cold start (trap: ids restarting at 1 make a reused submitit folder
  # hand back stale result pickles).  100 ids per wall-clock second, wrapping every ~7.7 days;
  # stays below the default MaxJobId (67043328).  Never goes backwards within a state dir.
  # A multi-node cluster counts from a block 50000 s ahead, so that it and a single-node cluster
  # started in the same second do not hand out the same ids (one submitit watcher sees both).
  local f=$STATE/last-first-job-id prev=0 id shift=0
  ((NODES > 1)) && shift=50000
  id=$(( (($(date +%s) + shift) % 670000) * 100 + 1 ))
  [[ -s $f ]] && prev=$(tr -dc '0-9' <"$f")
  if (( id <= ${prev:-0} && ${prev:-0} < 66990000 )); then id=$(( prev + 10000 )); fi
  echo "$id" >"$f"
  echo "$id"
}

node_name() {
  local h
  h=$(hostname -s 2>/dev/null || hostname)
  if [[ -n $h ]] && getent hosts "$h" >/dev/null 2>&1; then echo "$h"; else echo localhost; fi
}

write_configs() {
  local node mem first ctl_addr=127.0.0.1 kind=single-node nodelist spool pidf logf nodelines="" extra="" k
  node=$(node_name)
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
  [[ -n $mem ]] || mem=1000
  first=$(next_first_job_id)
  nodelist=$node spool=$STATE/slurmd pidf=$(pidfile slurmd) logf=$STATE/log/slurmd.log
  if ((NODES > 1)); then
    # slurmctld/slurmdbd listen in the root namespace; nodes reach them through the bridge address
    # (inside a node, 127.0.0.1 is that node's own loopback: sacct/submitit run there too).
    ctl_addr=$CTL_IP kind=$NODES-node nodelist=$(node_host 1)
    spool=$STATE/slurmd/%n pidf=$STATE/run/slurmd-%n.pid logf=$STATE/log/slurmd-%n.log
    for ((k = 1; k <= NODES; k++)); do
      nodelines+="NodeName=$(node_host "$k") NodeAddr=$(node_ip "$k") NodeHostname=$(node_host "$k") CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
      ((k > 1)) && nodelist+=,$(node_host "$k")
    done
    # fast failure detection: a node that stops answering is DOWN (and its jobs requeued) ~10 s later
    extra="SlurmdTimeout=${TLDIST_SLURM_SLURMD_TIMEOUT:-6}"$'\n'"MessageTimeout=3"$'\n'
  else
    nodelines="NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$CPUS RealMemory=$mem State=UNKNOWN"$'\n'
  fi
  cat >"$CONF" <<EOF
# generated by slurm/dev-cluster.sh -- $kind dev cluster, state in $STATE
ClusterName=$CLUSTER
SlurmctldHost=$node($ctl_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$spool
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$pidf
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$logf
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
${extra}MailProg=/bin/true
FirstJobId=$first
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ctl_addr
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
${nodelines}PartitionName=$PARTITION Nodes=$nodelist Default=YES MaxTime=7-00:00:00 State=UP PriorityTier=1 GraceTime=30
# jobs here preempt (requeue) jobs in $PARTITION when the node is full
PartitionName=urgent Nodes=$nodelist Default=NO MaxTime=7-00:00:00 State=UP PriorityTier=10 PreemptMode=OFF
EOF
  cat >"$DBDCONF" <<EOF
# generated by slurm/dev-cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdAddr=$ctl_addr
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DBDCONF"
  chmod 644 "$CONF"
  cat >"$STATE/ports.env" <<EOF
CTLD_PORT=$CTLD_PORT
SLURMD_PORT=$SLURMD_PORT
DBD_PORT=$DBD_PORT
DB_PORT=$DB_PORT
EOF
}

# ---------------------------------------------------------------- daemons
start_munge() {
  mkdir -p "$STATE/munge"; chmod 755 "$STATE/munge"
  if [[ ! -s $STATE/munge/munge.key ]]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$STATE/munge/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --force --socket="$MUNGE_SOCK" --key-file="$STATE/munge/munge.key" \
    --pid-file="$(pidfile munged)" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munge.seed" </dev/null >>"$STATE/log/munged.out" 2>&1 9>&- \
    || { dump_logs; die "munged failed to start"; }
  wait_for "munge socket" munged bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
}

start_mariadb() {
  local dd=$STATE/mysql/data
  mkdir -p "$STATE/mysql"
  if [[ ! -d $dd/mysql ]]; then
    rm -rf "$dd"
    mariadb-install-db --no-defaults --user=root --datadir="$dd" --skip-test-db \
      --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
      || { tail -n 30 "$STATE/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  spawn mariadbd mariadbd --no-defaults --user=root --datadir="$dd" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCK" --skip-name-resolve \
    --pid-file="$STATE/mysql/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --max-connections=50 \
    --performance-schema=OFF --innodb-lock-wait-timeout=900
  wait_for "mariadb" mariadbd mariadb-admin --no-defaults -S "$DB_SOCK" -uroot ping
  mariadb --no-defaults -S "$DB_SOCK" -uroot <<EOF || die "could not create the slurm DB user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON *.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

# ---------------------------------------------------------------- multi-node: network + slurmds
ours_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -x "$NETP-node[0-9]*" || true; }

net_down() {  # remove every namespace, veth and the bridge of this state dir (idempotent)
  local ns pid
  for ns in $(ours_netns); do
    # only processes this cluster started live there (slurmd, job steps): end them first
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
  done
  ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -x "$NETP-v[0-9]*" \
    | while read -r v; do ip link del "$v" 2>/dev/null || true; done || true
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE" || log "could not delete bridge $BRIDGE"; fi
  rm -f "$STATE/nodes.env"
}

net_up() {
  command -v ip >/dev/null || die "'ip' not found: install iproute2 (multi-node mode needs network namespaces)"
  command -v nsenter >/dev/null && command -v unshare >/dev/null || die "nsenter/unshare not found: install util-linux"
  [[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "TLDIST_SLURM_SUBNET=$SUBNET is not three octets (e.g. 10.213.7)"
  local other
  other=$(ip -o -4 addr show 2>/dev/null | awk -v b="$BRIDGE" '$2 != b' | grep -F " $SUBNET." | awk '{print $2}' | head -n1 || true)
  [[ -z $other ]] || die "subnet $SUBNET.0/24 is already used by interface $other: set TLDIST_SLURM_SUBNET to a free private /24"
  net_down
  printf 'NODES=%s\nSUBNET=%s\nNETP=%s\n' "$NODES" "$SUBNET" "$NETP" >"$STATE/nodes.env"
  # exit 5: this machine cannot make bridges/namespaces (no CAP_NET_ADMIN): the fixture skips outside CI
  ip link add "$BRIDGE" type bridge || { log "could not create bridge $BRIDGE (no CAP_NET_ADMIN?)"; exit 5; }
  ip addr add "$CTL_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local k ns veth peer
  for ((k = 1; k <= NODES; k++)); do
    ns=$(node_ns "$k") veth=$(node_veth "$k") peer=$NETP-p$k
    ip netns add "$ns" || { log "could not create netns $ns"; net_down; exit 5; }
    ip link add "$veth" type veth peer name "$peer" || die "could not create veth $veth"
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip link set "$peer" netns "$ns"
    # eth0 with the node's address, lo up, no default route, no IPv6 link-local
    nsenter --net="/run/netns/$ns" -- sh -ec "ip link set $peer name eth0
      ip link set eth0 addrgenmode none 2>/dev/null || true
      ip addr add $(node_ip "$k")/24 dev eth0
      ip link set eth0 up
      ip link set lo up" || die "could not configure $ns"
  done
  # the nodes' hosts file: the node names resolve to their bridge addresses everywhere (never a
  # 127.0.1.1 line for the own name: gloo would advertise loopback to the other nodes)
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_IP $(node_name)"
    for ((k = 1; k <= NODES; k++)); do echo "$(node_ip "$k") $(node_host "$k")"; done
  } >"$STATE/hosts"
  : >"$STATE/resolv.conf"
}

# node_exec K CMD...: run CMD on node K: its network namespace, its hostname, its /etc/hosts and an
# empty resolv.conf (nsenter --net + unshare: `ip netns exec` would remount /sys and hide cgroups,
# which slurmd needs).  `mount -n`: no /run/mount on the host.
node_exec() {
  local k=$1; shift
  [[ -e /run/netns/$(node_ns "$k") ]] || die "node $k does not exist (no netns $(node_ns "$k"); is the $NODES-node cluster in $STATE up?)"
  nsenter --net="/run/netns/$(node_ns "$k")" -- unshare --uts --mount --propagation private -- \
    sh -c 'mount -n --bind "$1" /etc/hosts && mount -n --bind "$2" /etc/resolv.conf && hostname "$3" && shift 3 && exec "$@"' \
    sh "$STATE/hosts" "$STATE/resolv.conf" "$(node_host "$k")" "$@"
}

node_slurmd_pid() { daemon_pid_file "$STATE/run/slurmd-$(node_host "$1").pid" slurmd; }

daemon_pid_file() {  # daemon_pid_file FILE COMM: the pid if alive and ours
  local pid
  [[ -s $1 ]] || return 1
  pid=$(tr -dc '0-9' <"$1")
  pid_is_ours "$pid" "$2" || return 1
  echo "$pid"
}

start_node_slurmd() {
  local k=$1
  mkdir -p "$STATE/slurmd/$(node_host "$k")"
  node_exec "$k" slurmd -f "$CONF" -N "$(node_host "$k")" </dev/null >>"$STATE/log/slurmd-$(node_host "$k").out" 2>&1 9>&- \
    || { dump_logs; die "slurmd of $(node_host "$k") failed to start"; }
}

kill_node_slurmd() {  # SIGKILL (a crash, not a shutdown)
  local pid
  pid=$(node_slurmd_pid "$1") || { log "slurmd of $(node_host "$1") is not running"; return 0; }
  kill -KILL "$pid"
  local i
  for ((i = 0; i < 50; i++)); do pid_is_ours "$pid" slurmd || return 0; sleep 0.1; done
}

stop_node_slurmd() {
  local pid i
  pid=$(node_slurmd_pid "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do pid_is_ours "$pid" slurmd || break; sleep 0.1; done
  pid_is_ours "$pid" slurmd && kill -KILL "$pid" 2>/dev/null
  rm -f "$STATE/run/slurmd-$(node_host "$1").pid"
}

all_nodes_idle() {
  local states
  states=$(sinfo -h -N -p "$PARTITION" -o '%T' 2>/dev/null) || return 1
  [[ $(grep -cx idle <<<"$states") == "$NODES" ]]
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

start_slurm() {
  mkdir -p "$STATE/ctld" "$STATE/slurmd"
  # slurmdbd daemonizes itself and finds slurmdbd.conf next to $SLURM_CONF
  slurmdbd </dev/null >>"$STATE/log/slurmdbd.out" 2>&1 9>&- || { dump_logs; die "slurmdbd failed to start"; }
  wait_for "slurmdbd (sacctmgr)" slurmdbd sacctmgr -n list cluster
  cluster_registered || sacctmgr -i add cluster "$CLUSTER" >/dev/null \
    || die "sacctmgr add cluster failed"
  # -c: cold start (ignore saved job state); -i: ignore errors in old state files
  slurmctld -c -i -f "$CONF" </dev/null >>"$STATE/log/slurmctld.out" 2>&1 9>&- \
    || { dump_logs; die "slurmctld failed to start"; }
  wait_for "slurmctld (scontrol ping)" slurmctld bash -c "scontrol ping | grep -q UP"
  if ((NODES > 1)); then
    local k
    for ((k = 1; k <= NODES; k++)); do start_node_slurmd "$k"; done
    wait_for "all $NODES nodes idle (sinfo -N)" slurmctld all_nodes_idle
    return 0
  fi
  slurmd -f "$CONF" -N "$(node_name)" </dev/null >>"$STATE/log/slurmd.out" 2>&1 9>&- \
    || { dump_logs; die "slurmd failed to start"; }
  wait_for "node idle (sinfo)" slurmd bash -c \
    "sinfo -h -p $PARTITION -o '%T' | grep -qx idle"
}

running() {  # all daemons alive and the controller answers
  local d
  for d in "${DAEMONS_STOP_ORDER[@]}"; do daemon_pid "$d" >/dev/null || return 1; done
  if ((NODES > 1)); then
    local k
    for ((k = 1; k <= NODES; k++)); do node_slurmd_pid "$k" >/dev/null || return 1; done
  fi
  [[ -f $CONF ]] && scontrol ping 2>/dev/null | grep -q UP
}

print_env() { echo "export SLURM_CONF=$CONF"; }

do_stop() {
  local d any=0 k
  for d in "${DAEMONS_STOP_ORDER[@]}"; do daemon_pid "$d" >/dev/null && any=1; done
  if ((NODES > 1)); then
    for ((k = 1; k <= NODES; k++)); do node_slurmd_pid "$k" >/dev/null && any=1; done
  fi
  if ((any == 0)); then
    ((NODES > 1)) && net_down
    log "not running ($STATE)"; return 0
  fi
  # Cancel jobs first so their slurmstepd/tasks do not outlive the cluster.
  if daemon_pid slurmctld >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
    local ids
    ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      local deadline=$((SECONDS + 12))
      while [[ -n $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    fi
  fi
  if ((NODES > 1)); then
    for ((k = 1; k <= NODES; k++)); do stop_node_slurmd "$k"; done
  fi
  for d in "${DAEMONS_STOP_ORDER[@]}"; do stop_daemon "$d"; done
  ((NODES > 1)) && net_down
  log "stopped ($STATE)"
}

do_start() {
  if running; then
    log "already running ($STATE)"
    print_env
    return 0
  fi
  local t0=$SECONDS
  mkdir -p "$STATE/run" "$STATE/log"
  install_packages
  do_stop >/dev/null 2>&1 || true   # clean up a half-started/stale cluster
  # Cold start: fresh controller/slurmd state; keep munge key and DB (unless FRESH).
  rm -rf "$STATE/ctld" "$STATE/slurmd"
  if [[ ${TLDIST_SLURM_FRESH:-0} == 1 ]]; then rm -rf "$STATE/mysql"; fi
  local d
  for d in munged mariadbd mariadb-install slurmdbd slurmctld slurmd; do rm -f "$STATE/log/$d.log" "$STATE/log/$d.out"; done
  [[ -s $STATE/dbpass ]] || { head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/dbpass"; }
  chmod 600 "$STATE/dbpass"
  DB_PASS=$(cat "$STATE/dbpass")
  choose_ports
  ((NODES > 1)) && net_up
  write_configs
  start_munge
  start_mariadb
  start_slurm
  if ((NODES > 1)); then
    local k desc=""
    for ((k = 1; k <= NODES; k++)); do desc+=" $(node_host "$k")=$(node_ip "$k")"; done
    log "up in $((SECONDS - t0)) s: $NODES nodes ($desc ), $CPUS CPUs each, controller $(node_name)=$CTL_IP on bridge $BRIDGE"
  else
    log "up in $((SECONDS - t0)) s: node $(node_name), $CPUS CPUs, partitions $PARTITION (default), urgent"
  fi
  print_env
}

do_status() {
  if [[ ! -f $CONF ]]; then log "no cluster configured in $STATE"; return 1; fi
  local d pid rc=0
  local daemons=(munged mariadbd slurmdbd slurmctld)
  ((NODES > 1)) || daemons+=(slurmd)
  for d in "${daemons[@]}"; do
    if pid=$(daemon_pid "$d"); then printf '%-10s pid %s\n' "$d" "$pid"
    else printf '%-10s DOWN\n' "$d"; rc=1; fi
  done
  if ((NODES > 1)); then
    local k
    for ((k = 1; k <= NODES; k++)); do
      if pid=$(node_slurmd_pid "$k"); then printf 'slurmd %-5s pid %s (%s in %s)\n' "$(node_host "$k")" "$pid" "$(node_ip "$k")" "$(node_ns "$k")"
      else printf 'slurmd %-5s DOWN\n' "$(node_host "$k")"; rc=1; fi
    done
  fi
  if ((rc == 0)) && scontrol ping 2>/dev/null | grep -q UP; then
    sinfo
    squeue
    print_env
  else
    rc=1
  fi
  return $rc
}

# Serialise start/stop of the same state dir between concurrent callers.
LOCKFILE=$STATE/.lock
if [[ $CMD == start || $CMD == stop || $CMD == restart ]]; then
  exec 9>"$LOCKFILE"
  flock -w 180 9 || die "could not lock $LOCKFILE"
fi

node_arg() {  # validate a node number given to a helper subcommand
  ((NODES > 1)) || die "'$CMD' needs a multi-node cluster (TLDIST_SLURM_NODES>=2; none recorded in $STATE)"
  [[ ${1:-} =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= NODES)) || die "node '${1:-}' is not a node number 1..$NODES"
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  env) print_env ;;
  nodes)
    ((NODES > 1)) || die "no multi-node cluster recorded in $STATE"
    for ((k = 1; k <= NODES; k++)); do echo "$(node_host "$k") $(node_ip "$k") $(node_ns "$k") $(node_veth "$k")"; done ;;
  node)
    node_arg "${HELPER_ARGS[0]:-}"
    ((${#HELPER_ARGS[@]} > 1)) || die "usage: $0 node K CMD..."
    node_exec "${HELPER_ARGS[@]}" ;;
  link)
    node_arg "${HELPER_ARGS[0]:-}"
    case ${HELPER_ARGS[1]:-} in
      up|down) ip link set "$(node_veth "${HELPER_ARGS[0]}")" "${HELPER_ARGS[1]}" ;;
      *) die "usage: $0 link K down|up" ;;
    esac ;;
  slurmd)
    node_arg "${HELPER_ARGS[0]:-}"
    case ${HELPER_ARGS[1]:-} in
      kill) kill_node_slurmd "${HELPER_ARGS[0]}" ;;
      start) node_slurmd_pid "${HELPER_ARGS[0]}" >/dev/null || start_node_slurmd "${HELPER_ARGS[0]}" ;;
      *) die "usage: $0 slurmd K kill|start" ;;
    esac ;;
  reset)
    node_arg "${HELPER_ARGS[0]:-}"
    keep=$(node_slurmd_pid "${HELPER_ARGS[0]}" || true)
    for pid in $(ip netns pids "$(node_ns "${HELPER_ARGS[0]}")" 2>/dev/null); do
      [[ $pid == "$keep" ]] || { log "reset: killing $(cat /proc/$pid/comm 2>/dev/null) ($pid) on $(node_host "${HELPER_ARGS[0]}")"; kill -KILL "$pid" 2>/dev/null || true; }
    done ;;
  resume)
    node_arg "${HELPER_ARGS[0]:-}"
    state=$(sinfo -h -N -n "$(node_host "${HELPER_ARGS[0]}")" -p "$PARTITION" -o %T 2>/dev/null || true)
    case $state in  # resuming a node that is not down/drained is an error in scontrol: nothing to do
      down*|drain*|fail*) scontrol update nodename="$(node_host "${HELPER_ARGS[0]}")" state=resume ;;
      *) log "$(node_host "${HELPER_ARGS[0]}") is ${state:-unknown}: nothing to resume" ;;
    esac ;;
esac
