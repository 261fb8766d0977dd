# A one-node SLURM cluster for the tests (sourced by .ci/run): start_slurm DIR starts munged,
# slurmctld and slurmd in the background from .ci/slurm.conf (this machine's name, CPUs and
# memory filled in from `slurmd -C`) with every file under DIR, and exports SLURM_CONF;
# stop_slurm stops them by pid. As root, or through sudo.
SLURM_PIDS=()

start_slurm() {
  local dir=$1 sudo=() node
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  export PATH=$PATH:/usr/sbin:/sbin   # the daemons (a user's PATH may lack them)
  mkdir -p "$dir/state" "$dir/spool"
  chmod 755 "$dir"   # munged wants its socket reachable
  "${sudo[@]}" dd if=/dev/urandom of="$dir/munge.key" bs=128 count=1 status=none
  "${sudo[@]}" chmod 600 "$dir/munge.key"
  node=$(slurmd -C | head -n 1)   # NodeName=<host> CPUs=... RealMemory=...
  sed -e "s|@NODE@|$node|" -e "s|@HOST@|$(hostname -s)|" -e "s|@DIR@|$dir|g" -e "s|@MUNGE@|$dir/munge.sock|" \
    .ci/slurm.conf > "$dir/slurm.conf"
  export SLURM_CONF=$dir/slurm.conf
  "${sudo[@]}" munged --foreground --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" \
    --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" > "$dir/munged.out" 2>&1 &
  SLURM_PIDS+=($!)
  for _ in $(seq 50); do [ -S "$dir/munge.sock" ] && break; sleep 0.1; done
  "${sudo[@]}" slurmctld -D -f "$SLURM_CONF" > "$dir/slurmctld.out" 2>&1 &
  SLURM_PIDS+=($!)
  "${sudo[@]}" slurmd -D -f "$SLURM_CONF" > "$dir/slurmd.out" 2>&1 &
  SLURM_PIDS+=($!)
  for _ in $(seq 60); do   # the node registers with the controller: idle
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { echo "slurm: one-node cluster up ($node)"; return 0; }
    sleep 1
  done
  echo "slurm: the cluster did not come up; the end of its logs:" >&2
  tail -n 20 "$dir"/*.log "$dir"/*.out >&2 || true
  return 1
}

stop_slurm() {
  local sudo=() pid
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  for pid in "${SLURM_PIDS[@]}"; do
    "${sudo[@]}" kill "$pid" 2>/dev/null || true
  done
  for pid in "${SLURM_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  SLURM_PIDS=()
}
