# Sourced: a cgroup subtree of this script's own for a run (systemd-nspawn, or a chroot), in every hierarchy
# nspawn uses (cgroup2, and the v1 name=systemd one), so that the end can end exactly what the
# run started (by PID) and remove exactly that. With --keep-unit and no host systemd, nspawn
# makes its payload/ and supervisor/ cgroups beside its own. Needs CG_NAME set and a die().
CG_DIRS=()
make_cgroups() {
  local mp fstype opts path dir
  while read -r mp fstype opts; do
    if [ "$fstype" = cgroup2 ]; then
      path=$(sed -n 's/^0:://p' /proc/self/cgroup)
    elif [ "$fstype" = cgroup ] && [[ ",$opts," == *,name=systemd,* ]]; then
      path=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup)
    else
      continue
    fi
    dir="$mp${path%/}/$CG_NAME"
    mkdir "$dir"
    CG_DIRS+=("$dir")
  done < <(awk '{for (i = 7; $i != "-"; i++); print $5, $(i + 1), $(i + 3)}' /proc/self/mountinfo)
  [ ${#CG_DIRS[@]} -gt 0 ] || die "no cgroup2 or name=systemd hierarchy mounted: nspawn cannot run"
}

# Moves the calling shell (a subshell about to exec nspawn) into the run's cgroups.
enter_cgroups() {
  local d
  for d in "${CG_DIRS[@]}"; do echo "$BASHPID" >"$d/cgroup.procs"; done
}

# PIDs of every process still in the run's cgroups.
cgroup_pids() {
  local d
  for d in "${CG_DIRS[@]}"; do
    [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

# Ends what is left (by PID), then removes the subtrees, deepest first.
remove_cgroups() {
  local pids deadline=$((SECONDS + 15)) d
  while pids=$(cgroup_pids) && [ -n "$pids" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "processes would not end: $pids" >&2; return 1; }
    echo "ending leftover processes by PID: $(echo $pids)" >&2
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  for d in "${CG_DIRS[@]}"; do
    [ ! -d "$d" ] || find "$d" -depth -type d -exec rmdir {} + || return 1
  done
}
