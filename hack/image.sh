#!/usr/bin/env bash
# Builds the memspace image (memspace:dev) from the Dockerfile, without a registry, and saves it
# as a `docker save` tar that a node's containerd imports (`ctr -n k8s.io images import`):
#
#   hack/image.sh [build]        build if any input changed; print the tar's path (make image)
#   hack/image.sh daemon-start   start the build's dockerd, print its DOCKER_HOST (tests use it)
#   hack/image.sh daemon-stop    stop it (containers first), leaving nothing running
#   hack/image.sh lock-file      the lock a build holds; whoever starts the dockerd for a while
#                                (tests/support/image.py) holds it too, so no one stops it under
#                                another's build
#
# The engine is Debian's docker.io (installed with apt-get when missing), a dockerd of our own with
# its own data root, exec root and socket under the cache, no iptables rules and no bridge, started
# for the build and stopped afterwards. Its base image is made here: debootstrap of Debian bookworm
# (minbase, with Debian's Python 3.11 and venv) from the mirror apt already uses, `docker import`ed
# and cached by recipe. pip in the build uses this machine's pip settings (host.py), passed in a
# copy of the sources. The build is skipped when the hash of its inputs (Dockerfile, lock file,
# sources, base recipe, this script) matches the saved tar's. Everything lives under
# ${MEMSPACE_IMAGE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/memspace}: docker/, base/, images/.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${MEMSPACE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/memspace}"
image="memspace:dev"
tar_path="$cache/images/memspace-dev.tar"
docker_dir="$cache/docker"
socket="$docker_dir/docker.sock"
pidfile="$docker_dir/dockerd.pid"
cgroup_parent=memspace-image  # the containers' cgroups, removed when the daemon stops
export DOCKER_HOST="unix://$socket"
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit would ask a registry for its frontend
# Debian's client, which speaks dockerd 20.10's API (another docker may come first on PATH).
docker=/usr/bin/docker
dockerd=/usr/sbin/dockerd
# The base: Debian bookworm, minbase, with what the Dockerfile needs of a base. Changing the
# recipe (suite, packages, cleanup below) makes a new base; bump BASE_RECIPE for cleanup changes.
suite=bookworm
base_packages=python3,python3-venv,passwd
BASE_RECIPE=2
# The sources the image is built from: exactly what the Dockerfile copies (the context is staged).
context_paths=(Dockerfile .dockerignore requirements.lock pyproject.toml README.md
               server contract operator cli hack/image/pip)

say() { printf '[image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

ensure_packages() { # apt-get install whatever of Debian's docker.io and debootstrap is missing
  local missing=()
  [[ -x "$dockerd" && -x "$docker" ]] || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]} (apt-get)"
  [[ $(id -u) -eq 0 ]] || die "installing ${missing[*]} needs root"
  # Packages must not start the system's own dockerd (with its iptables rules and bridge): no
  # service starts during the install, through the policy layer that invoke-rc.d consults.
  local policy=/usr/sbin/policy-rc.d placed=""
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && placed=1
  fi
  # The lists may be missing or stale on a fresh machine: update once, then install.
  if ! { apt-get update -q -o DPkg::Lock::Timeout=600 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
              -o DPkg::Lock::Timeout=600 "${missing[@]}"; } >"$cache/apt.log" 2>&1; then
    if [[ -n "$placed" ]]; then rm -f "$policy"; fi
    tail -20 "$cache/apt.log" >&2
    die "apt-get install ${missing[*]} failed (log: $cache/apt.log)"
  fi
  if [[ -n "$placed" ]]; then rm -f "$policy"; fi
}

daemons() { # the PIDs of every dockerd on our data root (whoever started it, whatever pidfile)
  local proc
  for proc in /proc/[0-9]*; do
    [[ "$(readlink "$proc/exe" 2>/dev/null)" == "$dockerd" ]] || continue
    tr '\0' '\n' <"$proc/cmdline" 2>/dev/null | grep -qxF "$docker_dir/data" \
      && echo "${proc#/proc/}"
  done
  return 0
}

daemon_start() {
  mkdir -p "$docker_dir"
  if [[ -n "$(daemons)" ]]; then
    # Another run's daemon (a build, or a test's engine under the same lock) may be starting.
    local waited=0
    until "$docker" version >/dev/null 2>&1; do
      (( waited < 120 )) || die "a dockerd ($(daemons | xargs)) holds $docker_dir but does not answer"
      sleep 0.5; waited=$((waited + 1))
    done
    return 0
  fi
  rm -f "$socket" "$pidfile"
  say "starting dockerd (data root $docker_dir/data)"
  # Only Debian's binaries on PATH: dockerd starts the containerd and runc it finds there.
  # setsid: the daemon must not take a terminal's signals; its output goes to a log.
  PATH=/usr/sbin:/usr/bin:/sbin:/bin setsid "$dockerd" \
    --data-root "$docker_dir/data" --exec-root "$docker_dir/run" \
    --host "$DOCKER_HOST" --pidfile "$pidfile" \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    --oom-score-adjust=0 --log-level=warn --cgroup-parent="/$cgroup_parent" \
    </dev/null >"$docker_dir/dockerd.log" 2>&1 9>&- &
  local waited=0
  until "$docker" version >/dev/null 2>&1; do
    if (( waited >= 120 )); then
      tail -20 "$docker_dir/dockerd.log" >&2
      daemon_stop
      die "dockerd did not answer on $socket within 60 s"
    fi
    sleep 0.5; waited=$((waited + 1))
  done
}

daemon_stop() {
  local pids; pids="$(daemons | xargs)"
  if [[ -n "$pids" ]]; then
    local containers
    containers="$("$docker" ps -q 2>/dev/null || true)"
    if [[ -n "$containers" ]]; then
      # shellcheck disable=SC2086  # one argument per container ID
      "$docker" rm -f $containers >/dev/null 2>&1 || true
    fi
    # shellcheck disable=SC2086  # one argument per PID
    kill -TERM $pids 2>/dev/null || true
    local waited=0 pid
    for pid in $pids; do
      while kill -0 "$pid" 2>/dev/null; do
        if (( waited >= 60 )); then kill -KILL "$pid" 2>/dev/null || true; fi
        sleep 0.5; waited=$((waited + 1))
      done
    done
  fi
  # What dockerd leaves behind when it stops (or when it was killed): its network namespace's
  # bind mount, its data root's bind mount on itself, the containers' cgroups (deepest first).
  local mounted
  for mounted in "$docker_dir/run/netns/default" "$docker_dir/data"; do
    while mountpoint -q "$mounted" 2>/dev/null; do umount "$mounted" || break; done
  done
  rm -f "$pidfile" "$socket"
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    if [[ -d "$hierarchy$cgroup_parent" ]]; then
      find "$hierarchy$cgroup_parent" -depth -type d -exec rmdir {} + 2>/dev/null || true
    fi
  done
}

base_image() { # prints the tag of the local base image, making it if needed
  local key
  key="$(printf '%s\n' "$suite" "$base_packages" "$BASE_RECIPE" | sha256sum | cut -c1-16)"
  local tag="memspace-base:$suite-$key" rootfs_tar="$cache/base/$suite-$key.tar"
  if "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"; return 0
  fi
  if [[ ! -f "$rootfs_tar" ]]; then
    local mirror
    mirror="$(python3 "$repo/hack/image/host.py" apt-mirror "$suite")" \
      || die "no apt source for $suite: debootstrap needs a Debian mirror"
    local root="$cache/base/.rootfs"  # under the build lock; a failed run's is removed here
    rm -rf "$root"; mkdir -p "$root"
    say "debootstrap $suite (minbase + $base_packages), a few minutes on a cold cache"
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$root" "$mirror" \
      >"$cache/base/debootstrap.log" 2>&1 \
      || { tail -20 "$cache/base/debootstrap.log" >&2; die "debootstrap failed"; }
    # What a container base does not need: package caches, lists, logs, documentation and
    # translations (about 50 MB; glibc's locale.alias stays).
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
           "$root"/var/log/* "$root"/tmp/* \
           "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    tar --numeric-owner --xattrs -C "$root" -cf "$rootfs_tar.tmp" .
    mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$root"
  fi
  # A new base: what was built on an older one is stale, its build cache too. Start clean.
  "$docker" image prune --all --force >/dev/null
  find "$cache/base" -maxdepth 1 -name '*.tar' ! -name "$(basename "$rootfs_tar")" -delete
  say "importing the base as $tag"
  "$docker" import "$rootfs_tar" "$tag" >/dev/null
  echo "$tag"
}

stage_context() { # stage_context DIR: the build context, with this machine's pip settings
  local dir="$1" path
  rm -rf "$dir"; mkdir -p "$dir"
  for path in "${context_paths[@]}"; do
    mkdir -p "$dir/$(dirname "$path")"
    cp -a "$repo/$path" "$dir/$path"
  done
  find "$dir" -name __pycache__ -prune -exec rm -rf {} +
}

inputs_hash() { # inputs_hash DIR EXTRA: hash of a staged context (before pip settings) and EXTRA
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; echo "$2") \
    | sha256sum | cut -c1-16
}

build() {
  mkdir -p "$cache/images" "$cache/base"
  exec 9>"$cache/.image.lock"
  flock 9  # one build per machine at a time
  local staged="$cache/images/.context"
  stage_context "$staged"
  # The base's key stands for the base: an unchanged recipe keeps the cached image.
  local base_key
  base_key="$(printf '%s\n' "$suite" "$base_packages" "$BASE_RECIPE" | sha256sum | cut -c1-16)"
  local hash; hash="$(inputs_hash "$staged" "$base_key $(sha256sum <"$0")")"
  if [[ -f "$tar_path" && "$(cat "$tar_path.inputs" 2>/dev/null)" == "$hash" ]]; then
    rm -rf "$staged"
    say "$image is up to date (inputs $hash)"
    echo "$tar_path"; return 0
  fi
  ensure_packages
  local started=""
  [[ -n "$(daemons)" ]] || started=1
  # shellcheck disable=SC2064  # expand now: stop only a daemon this run started
  trap "rm -rf '$staged'; ${started:+daemon_stop}" EXIT
  daemon_start
  local base; base="$(base_image)"
  python3 "$repo/hack/image/host.py" pip-config "$staged/hack/image/pip"
  : >"$cache/images/build.log"
  say "docker build $image on $base (inputs $hash)"
  # The build stage is tagged too: it stays as the builder's cache (a source change does not
  # download the locked packages again), while everything untagged (an older image, the cache of
  # an older lock) is pruned after the build.
  local target
  for target in build final; do
    local tag="$image" stage=()
    [[ "$target" == build ]] && tag="memspace-build:dev" stage=(--target build)
    "$docker" build --network host --build-arg "BASE_IMAGE=$base" "${stage[@]}" -t "$tag" \
      --label "dev.memspace.inputs=$hash" "$staged" >>"$cache/images/build.log" 2>&1 \
      || { tail -30 "$cache/images/build.log" >&2
           die "docker build failed (log: $cache/images/build.log)"; }
  done
  "$docker" save -o "$tar_path.tmp" "$image"
  mv "$tar_path.tmp" "$tar_path"
  echo "$hash" >"$tar_path.inputs"
  "$docker" image prune --force >/dev/null
  say "saved $image: $(du -h "$tar_path" | cut -f1)"
  echo "$tar_path"
}

case "${1:-build}" in
  build) build ;;
  lock-file) echo "$cache/.image.lock" ;;
  daemon-start) mkdir -p "$cache"; ensure_packages; daemon_start; echo "$DOCKER_HOST" ;;
  daemon-stop) daemon_stop ;;
  *) die "usage: $0 [build|daemon-start|daemon-stop]" ;;
esac
