#!/usr/bin/env bash
# Installs kmsagent from this checkout (SPEC §7): a virtual environment, the config, a log folder,
# two wrappers and two systemd units, and PREFIX/.kmsagent-manifest listing what it made (all that
# uninstall.sh removes). Run it again to upgrade: the operator's config is kept. As a user other
# than root, with --no-systemd, it installs for that user alone (say --prefix ~/.local/kmsagent).
set -euo pipefail

# The agent runs as its own user and must read the venv and the config: a hardened root umask
# (077) would make them unreadable to it.
umask 022

readonly default_prefix=/usr/local/alibabacloudkmsagent
readonly token_file=/var/run/kmstoken
readonly agent_user=kmsagent
readonly token_group=kmstokenreader
# With the units: the agent's Unix socket, in the folder systemd makes for it (RuntimeDirectory=).
readonly socket_path=/run/kmsagent/kmsagent.sock
# Drop-ins for what the agent's sandbox forbids, installed to PREFIX/share/systemd/, not enabled.
readonly dropin_names=(files-folders.conf files-owner.conf exec-jit.conf)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly repo
# shellcheck source=scripts/_prefix.sh
source "$repo/scripts/_prefix.sh"

usage() {
  cat <<EOF
Usage: scripts/install.sh [--prefix DIR] [--root DIR] [--no-systemd] [--help]

Installs kmsagent from this checkout into DIR (default $default_prefix):
  DIR/venv/                  Python virtual environment with the package (\$PYTHON, else python3; >= 3.11)
  DIR/conf/kmsagent.toml     the config; an existing one is kept (upgrades keep the operator's edits)
  DIR/logs/                  the log folder, owned by the '$agent_user' user
  DIR/bin/kmsagent           runs the agent from DIR/venv
  DIR/bin/kmsagent-token     writes a fresh random token to a file (used by kmsagent-token.service)
and the systemd units kmsagent-token.service (writes $token_file, mode 0640, group
'$token_group') and kmsagent.service (the agent, as user '$agent_user') to $final_units_dir/.
It creates the system user '$agent_user' and the system group '$token_group', then enables and
starts both units. DIR/$manifest_name lists every file and folder it made: uninstall.sh
removes those and nothing else. DIR must be a folder of kmsagent's own (not /usr/local, not a
home folder) that is new, empty, or an earlier install. Needs root, except with --root or, for a
user-level install (no accounts, no units; say --prefix ~/.local/kmsagent), with --no-systemd.

Options:
  --prefix DIR   install into DIR (default $default_prefix)
  --root DIR     stage everything under DIR (DIR/<prefix>, DIR/etc/systemd/system) for a package:
                 no users, no chown, no systemctl; prints what must be done on the target host
  --no-systemd   install no unit files and do not call systemctl
  --help         show this help
EOF
}

# One line on stderr; 2 = bad command line, 1 = the installation failed.
usage_error() {
  echo "install.sh: $*; see --help" >&2
  exit 2
}
die() {
  echo "install.sh: $*" >&2
  exit 1
}
say() { echo "install.sh: $*"; }

prefix=$default_prefix
root=""
with_systemd=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix | --root)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a directory"; fi
      if [ "$1" = --prefix ]; then prefix=$2; else root=$2; fi
      shift 2
      ;;
    --prefix=*) prefix=${1#*=} && shift ;;
    --root=*) root=${1#*=} && shift ;;
    --no-systemd) with_systemd=0 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done

prefix=${prefix%/}
if [ -n "$root" ]; then
  [[ $root != *[[:space:]]* ]] || usage_error "--root must not contain whitespace: '$root'"
  root=$(realpath -m -- "$root")
  [ "$root" != / ] || root=""
fi
# The final and the staged path both: --root must not be a way around the rule.
check_prefix "$prefix" "$root"
# `staged` is where files go now; `prefix` is where they will live (and what the units name).
staged=$root$prefix
units_dir=$root$final_units_dir
manifest=$staged/$manifest_name

# Fail before changing anything: a live install needs root (or --no-systemd, to install for the
# user running it), and units need a running systemd.
user_install=0
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  [ "$with_systemd" = 0 ] ||
    die "run as root to install to $prefix with systemd units (or add --no-systemd for a user-level install, or stage with --root DIR)"
  user_install=1
fi
if [ -z "$root" ] && [ "$user_install" = 0 ]; then
  if [ "$with_systemd" = 1 ]; then
    if ! command -v systemctl >/dev/null || [ ! -d /run/systemd/system ]; then
      die "systemd is not running on this host; use --no-systemd (and start the agent yourself) or --root DIR"
    fi
  fi
  for tool in getent groupadd useradd usermod; do
    command -v "$tool" >/dev/null || die "'$tool' is missing; it is needed to create the '$agent_user' user"
  done
fi
for file in pyproject.toml src/kmsagent/__init__.py conf/kmsagent.toml; do
  [ -f "$repo/$file" ] || die "$repo is not a kmsagent checkout (no $file)"
done

python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "no Python interpreter '$python'; set \$PYTHON to Python 3.11 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "kmsagent needs Python 3.11 or newer; '$python' is $("$python" -c 'import platform; print(platform.python_version())'); set \$PYTHON"

# --- the manifest ----------------------------------------------------------------------------
# A folder that holds other things is not ours to fill: its files would be mixed with kmsagent's.
if [ -d "$staged" ] && [ ! -e "$manifest" ] && [ ! -e "$staged/$legacy_marker_name" ] && [ -n "$(ls -A "$staged")" ]; then
  die "$staged is not empty and is not a kmsagent install (no $manifest_name); choose a new or empty folder"
fi
# What earlier runs made and still exists, then what this run makes: folders only if they are
# new, the venv and the files it writes always, and the config only if it is new (an existing one
# is the operator's, unless an earlier run made it).
entries=()
if [ -e "$manifest" ]; then
  read_manifest "$manifest" "$prefix" "$root"
  for entry in "${manifest_entries[@]}"; do
    if [ -e "$root$entry" ] || [ -L "$root$entry" ]; then entries+=("$entry"); fi
  done
elif [ -e "$staged/$legacy_marker_name" ]; then
  # Made by install.sh before it kept a manifest, always with this layout: adopt what exists of it.
  for entry in "" /venv /bin /bin/kmsagent /bin/kmsagent-token /conf /conf/kmsagent.toml /logs; do
    if [ -e "$staged$entry" ]; then entries+=("$prefix$entry"); fi
  done
  for unit in "${unit_names[@]}"; do
    if [ -e "$units_dir/$unit" ]; then entries+=("$final_units_dir/$unit"); fi
  done
fi
for entry in "" /bin /conf /conf/kmsagent.toml /logs; do
  [ -e "$staged$entry" ] || entries+=("$prefix$entry")
done
entries+=("$prefix/venv" "$prefix/bin/kmsagent" "$prefix/bin/kmsagent-token")
if [ "$with_systemd" = 1 ]; then
  for unit in "${unit_names[@]}"; do entries+=("$final_units_dir/$unit"); done
  for entry in /share /share/systemd; do
    [ -e "$staged$entry" ] || entries+=("$prefix$entry")
  done
  for dropin in "${dropin_names[@]}"; do entries+=("$prefix/share/systemd/$dropin"); done
fi

mkdir -p "$staged/bin" "$staged/conf" "$staged/logs" || die "cannot create $staged (may $(id -un) write there?)"
# Written first, so that a run that fails half-way (no network for pip) can be repeated or undone.
write_manifest "$manifest" "${entries[@]}"
rm -f "$staged/$legacy_marker_name"
chmod 0755 "$staged" "$staged/bin"
chmod 0750 "$staged/conf" "$staged/logs"

# --- the virtual environment ---------------------------------------------------------------
# Built in place (at the staged path with --root): a venv names its own path in its scripts and
# its interpreter by absolute path, so a packager who moves the tree must rebuild the venv there.
venv=$staged/venv
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "creating the virtual environment $venv"
  "$python" -m venv --clear "$venv" ||
    die "could not create a virtual environment at $venv (Debian/Ubuntu: apt install python3-venv)"
fi
# pip builds a local project in its own folder, writing build/ and *.egg-info there: build from a
# snapshot instead, which leaves the checkout untouched and is immune to edits made meanwhile.
snapshot="$(mktemp -d "${TMPDIR:-/tmp}/kmsagent-src.XXXXXX")"
trap 'rm -rf "$snapshot"' EXIT
sources=(pyproject.toml README.md src)
if [ -f "$repo/NOTICE" ]; then sources+=(NOTICE); fi
tar -C "$repo" --exclude=__pycache__ --exclude='*.egg-info' -cf - "${sources[@]}" | tar -C "$snapshot" -xf -
say "installing kmsagent into $venv"
# The dependencies are requirements-runtime.lock's: the versions the tests ran against, each file
# checked against its hash (an upgrade moves them to the new lock's versions). Then the package,
# which adds none of its own; pip always rebuilds and reinstalls a local project, so an upgrade
# gets the new code even when the version number did not change.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
  -r "$repo/requirements-runtime.lock" ||
  die "pip could not install kmsagent's locked dependencies into $venv (see its output above)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$snapshot" ||
  die "pip could not install kmsagent into $venv (see its output above)"
version=$("$venv/bin/python" -c 'import kmsagent; print(kmsagent.__version__)') ||
  die "kmsagent does not import from $venv"

# --- wrappers ------------------------------------------------------------------------------
# kmsagent finds the venv from its own path, so the staged tree works as well as the final one.
cat >"$staged/bin/kmsagent" <<'EOF'
#!/bin/sh
# Runs kmsagent from the virtual environment beside this folder; arguments go to kmsagent.
here=$(dirname "$(readlink -f "$0")")
exec "$here/../venv/bin/python" -m kmsagent "$@"
EOF
cat >"$staged/bin/kmsagent-token" <<'EOF'
#!/bin/sh
# Writes a fresh random SSRF token to FILE (default /var/run/kmstoken): mode 0640, owned by the
# caller, group $KMSAGENT_TOKEN_GROUP (default kmstokenreader). The file is replaced in one
# rename, so kmsagent and programs never read a partial token; kmsagent picks a new one up by
# itself. Needs only coreutils. Usage: kmsagent-token [FILE]
set -eu
target=${1:-/var/run/kmstoken}
group=${KMSAGENT_TOKEN_GROUP-kmstokenreader}
umask 077
# A group that does not exist would leave a token no reader can use: fail now, visibly.
if [ -n "$group" ] && ! getent group "$group" >/dev/null; then
  echo "kmsagent-token: the group '$group' does not exist (install.sh creates it)" >&2
  exit 1
fi
tmp=$(mktemp "$(dirname "$target")/.kmstoken.XXXXXX")
trap 'rm -f "$tmp"' EXIT
# 32 bytes from the kernel's CSPRNG as 64 hex digits.
od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp"
echo >>"$tmp"
[ "$(wc -c <"$tmp")" -eq 65 ] || { echo "kmsagent-token: could not read 32 random bytes" >&2; exit 1; }
chmod 0640 "$tmp"
[ -z "$group" ] || chgrp "$group" "$tmp"
mv -f "$tmp" "$target"
trap - EXIT
EOF
chmod 0755 "$staged/bin/kmsagent" "$staged/bin/kmsagent-token"

# --- the config ----------------------------------------------------------------------------
conf=$staged/conf/kmsagent.toml
if [ -e "$conf" ]; then
  say "keeping the existing config $conf"
else
  # The shipped defaults, with the log folder moved into the prefix (the service's only writable
  # path) and, under systemd, a Unix socket that the token readers' group may use. A template
  # without those lines is a broken checkout: say so rather than guess.
  if [ "$with_systemd" = 1 ]; then socket=$socket_path socket_group=$token_group; else socket="" socket_group=""; fi
  awk -v logs="$prefix/logs/" -v socket="$socket" -v group="$socket_group" '
    /^[[:space:]]*\[/ { section = $1 }
    section == "[Log]" && /^[[:space:]]*Path[[:space:]]*=/ { sub(/"[^"]*"/, "\"" logs "\""); done++ }
    section == "[Server]" && /^[[:space:]]*UnixSocket[[:space:]]*=/ { sub(/"[^"]*"/, "\"" socket "\""); done++ }
    section == "[Server]" && /^[[:space:]]*UnixSocketGroup[[:space:]]*=/ { sub(/"[^"]*"/, "\"" group "\""); done++ }
    { print }
    END { exit done == 3 ? 0 : 3 }
  ' "$repo/conf/kmsagent.toml" >"$conf.tmp" || {
    rm -f "$conf.tmp"
    die "conf/kmsagent.toml lacks a [Log] Path, [Server] UnixSocket or [Server] UnixSocketGroup line to set"
  }
  chmod 0640 "$conf.tmp"
  mv -f "$conf.tmp" "$conf"
  say "installed the config $conf"
fi
# An invalid config would only show up as a service that keeps restarting.
check=$("$venv/bin/python" -m kmsagent --check-config --config "$conf" 2>&1 >/dev/null) ||
  die "the config $conf is invalid: $check"

# --- systemd units -------------------------------------------------------------------------
# The only copy of the units; they name the final paths, never the staging root.
write_token_unit() {
  cat <<EOF
# Installed by kmsagent's scripts/install.sh.
[Unit]
Description=kmsagent SSRF token ($token_file)
Before=kmsagent.service

[Service]
Type=oneshot
RemainAfterExit=yes
# Restarting this unit rotates the token; kmsagent reads the new file within a second.
ExecStart=$prefix/bin/kmsagent-token $token_file
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=/run
ProtectHome=yes
PrivateTmp=yes
PrivateNetwork=yes

[Install]
WantedBy=multi-user.target
EOF
}

write_agent_unit() {
  cat <<EOF
# Installed by kmsagent's scripts/install.sh, which rewrites it on upgrade: change it with a
# drop-in (systemctl edit kmsagent). Drop-ins for what the sandbox below forbids ([[Files]]
# outside the log folder, their Owner/Group, JIT runtimes under [Exec]) are in
# $prefix/share/systemd/, not enabled.
[Unit]
Description=kmsagent: local secret-caching agent for Alibaba Cloud KMS
Requires=kmsagent-token.service
After=kmsagent-token.service network-online.target
# Wants, not Requires: a target is only a synchronisation point; stopping it must not stop the agent.
Wants=network-online.target

[Service]
# READY=1 once the agent listens (after Prefetch and the first [[Files]] writes), RELOADING=1 on
# SIGHUP, and WATCHDOG=1 every WatchdogSec/2 from its event loop: a loop stuck for WatchdogSec is
# killed and, by Restart=on-failure, started again. Only the agent may notify, not its [Exec] program.
Type=notify
NotifyAccess=main
WatchdogSec=30
User=$agent_user
Group=$agent_user
SupplementaryGroups=$token_group
Environment=KMS_TOKEN=file://$token_file
ExecStart=$prefix/venv/bin/python -m kmsagent --config $prefix/conf/kmsagent.toml
# The agent reloads its config on SIGHUP.
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
# The agent exits within 5 s of SIGTERM; with an [Exec] program, within StopTimeoutSeconds + 2 s
# (10 + 2 by default). Keep this at least StopTimeoutSeconds + 5 when you raise that.
TimeoutStopSec=15
# MaxConn = 1000 (its highest) needs 1258 descriptors (server.py); the rest is for [Exec] programs.
LimitNOFILE=4096
UMask=0077
# /run/kmsagent, owned by the agent's user, for its Unix socket ([Server] UnixSocket): made at
# start, removed at stop. 0755: the socket's group reaches the socket, whose own mode admits it.
RuntimeDirectory=kmsagent
RuntimeDirectoryMode=0755

# Hardening: the agent reads its venv, config and token, writes only its logs and its socket, and
# talks TCP. Every setting here is known to systemd 239 (Alibaba Cloud Linux 3), so none is warned
# about and ignored there. On systemd >= 245, ProtectKernelLogs, ProtectClock, ProtectHostname and
# RestrictSUIDSGID (all =yes) may be added. Not PrivateUsers: it would hide the token's group.
# systemd-analyze security rates this unit 2.1 OK (systemd 252).
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$prefix/logs
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
RemoveIPC=yes
# CPython needs no writable+executable memory (no JIT; kmsagent uses no ctypes callbacks).
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
# The system calls of an ordinary service (chown included: the socket's group); others fail with EPERM.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
EOF
}

# --- drop-ins: PREFIX/share/systemd/, for the operator to copy to kmsagent.service.d/ -------------
dropin_header() {
  cat <<EOF
# kmsagent drop-in, installed by scripts/install.sh in $prefix/share/systemd/ and NOT enabled.
# To enable it, as root:
#   mkdir -p $final_units_dir/kmsagent.service.d
#   cp $prefix/share/systemd/$1 $final_units_dir/kmsagent.service.d/
#   (edit the copy first if the text below asks you to)
#   systemctl daemon-reload && systemctl restart kmsagent
# To disable it: remove the copy, then the same daemon-reload and restart.
EOF
}

write_dropin() {
  dropin_header "$1"
  case $1 in
    files-folders.conf)
      cat <<EOF
#
# [[Files]] outside the log folder. The unit's sandbox (ProtectSystem=strict) leaves every path
# read-only but $prefix/logs, so writing a [[Files]] Path elsewhere fails
# ("Read-only file system"). List the folders of your [[Files]] Paths below, space-separated, in
# place of the example. Each must exist before the agent starts (else the unit fails to start),
# and only root and the agent may write to it: chown $agent_user FOLDER && chmod 0750 FOLDER.
[Service]
ReadWritePaths=/var/lib/myapp/secrets
EOF
      ;;
    files-owner.conf)
      cat <<EOF
#
# [[Files]] with Owner or Group: only an agent running as root may give a file to another user.
# Root here, with no capability but CAP_CHOWN (to give the file to Owner and Group) and CAP_FOWNER
# (to set its Mode once it is no longer root's). Without CAP_DAC_OVERRIDE, root obeys file modes
# like any user: before enabling this, give root the log folder (and give it back when you
# disable it):
#   chown -R root:root $prefix/logs        (back: chown -R $agent_user:$agent_user $prefix/logs)
# Root can read the token file and the config as it is: it owns both.
[Service]
User=root
Group=root
CapabilityBoundingSet=CAP_CHOWN CAP_FOWNER
EOF
      ;;
    exec-jit.conf)
      cat <<EOF
#
# An [Exec] program that needs writable and executable memory: JIT runtimes (Java, Node.js, .NET,
# PyPy, LuaJIT). It inherits the agent's sandbox, where MemoryDenyWriteExecute=yes makes such
# memory fail (the runtime aborts at start, e.g. Node.js with "Fatal process out of memory").
# This lifts that, for the agent and its program together.
[Service]
MemoryDenyWriteExecute=no
# A program that needs system calls beyond @system-service fails with EPERM ("Operation not
# permitted"); remove the '#' of the next line to lift the system call filter too.
#SystemCallFilter=
EOF
      ;;
  esac
}

if [ "$with_systemd" = 1 ]; then
  mkdir -p "$units_dir"
  write_token_unit >"$units_dir/kmsagent-token.service"
  write_agent_unit >"$units_dir/kmsagent.service"
  chmod 0644 "$units_dir/kmsagent-token.service" "$units_dir/kmsagent.service"
  say "installed $units_dir/kmsagent-token.service and $units_dir/kmsagent.service"
  mkdir -p "$staged/share/systemd"
  chmod 0755 "$staged/share" "$staged/share/systemd"
  for dropin in "${dropin_names[@]}"; do
    write_dropin "$dropin" >"$staged/share/systemd/$dropin"
    chmod 0644 "$staged/share/systemd/$dropin"
  done
  say "installed the drop-ins ${dropin_names[*]} to $prefix/share/systemd/, not enabled (see their first lines)"
fi

# --- staged: tell the packager what is left to do ---------------------------------------------
if [ -n "$root" ]; then
  cat <<EOF
install.sh: staged kmsagent $version under $root (for $prefix).
On the target host, as root:
  groupadd --system $token_group
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $agent_user
  usermod -a -G $token_group $agent_user
  chown $agent_user:$agent_user $prefix/logs && chgrp -R $agent_user $prefix/conf
EOF
  [ "$with_systemd" = 0 ] ||
    echo "  systemctl daemon-reload && systemctl enable --now kmsagent-token.service kmsagent.service"
  cat <<EOF
The venv $staged/venv works only where it was built (its scripts and interpreter link name
absolute paths): when the tree moves to $prefix, rebuild it there with
  python3 -m venv --clear $prefix/venv && $prefix/venv/bin/python -m pip install <kmsagent checkout>
EOF
  exit 0
fi

# --- for the user running it: no accounts, no units ------------------------------------------
if [ "$user_install" = 1 ]; then
  user_token=${XDG_RUNTIME_DIR:-${HOME:-~}}/kmstoken
  cat <<EOF
install.sh: kmsagent $version installed in $prefix for $(id -un); nothing runs it yet. Start it with:
  KMSAGENT_TOKEN_GROUP= $prefix/bin/kmsagent-token $user_token
  KMS_TOKEN=file://$user_token $prefix/bin/kmsagent --config $conf
Remove it with: scripts/uninstall.sh --prefix $prefix --no-systemd
EOF
  exit 0
fi

# --- live: accounts, ownership, services -----------------------------------------------------
getent group "$token_group" >/dev/null || groupadd --system "$token_group"
if ! getent passwd "$agent_user" >/dev/null; then
  nologin=/bin/false
  for shell in /usr/sbin/nologin /sbin/nologin; do
    if [ -x "$shell" ]; then nologin=$shell && break; fi
  done
  # A leftover group of the same name (e.g. after a userdel that kept it) is reused.
  if getent group "$agent_user" >/dev/null; then group_option=(-g "$agent_user"); else group_option=(--user-group); fi
  useradd --system "${group_option[@]}" --no-create-home --home-dir /nonexistent --shell "$nologin" "$agent_user"
fi
usermod -a -G "$token_group" "$agent_user"
chown "$agent_user:$agent_user" "$prefix/logs"
chgrp "$agent_user" "$prefix/conf" "$prefix/conf/kmsagent.toml"
chmod g+r "$prefix/conf/kmsagent.toml"

if [ "$with_systemd" = 1 ]; then
  systemctl daemon-reload
  # An upgrade must run the new code: restart the agent if it runs. The token unit is left alone,
  # as restarting it would rotate the token under the programs that use it.
  systemctl try-restart kmsagent.service
  systemctl enable --now kmsagent-token.service kmsagent.service
  say "kmsagent $version is running: systemctl status kmsagent.service"
else
  say "kmsagent $version installed; start it with: KMS_TOKEN=... $prefix/bin/kmsagent --config $conf"
fi
