#!/usr/bin/env bash
# Removes what scripts/install.sh installed. Keeps the config (and the accounts) unless --purge,
# so that a later install.sh picks up where this one left off.
set -euo pipefail

readonly default_prefix=/usr/local/alibabacloudkmsagent
readonly token_file=/var/run/kmstoken
readonly agent_user=kmsagent
readonly token_group=kmstokenreader
readonly marker_name=.kmsagent-install
readonly units=(kmsagent.service kmsagent-token.service)

usage() {
  cat <<EOF
Usage: scripts/uninstall.sh [--prefix DIR] [--root DIR] [--purge] [--help]

Stops and disables kmsagent.service and kmsagent-token.service (on a host running systemd),
removes their unit files from /etc/systemd/system/, $token_file, and DIR (default
$default_prefix) except DIR/conf/.

Options:
  --prefix DIR   the prefix given to install.sh (default $default_prefix)
  --root DIR     remove a tree staged with install.sh --root DIR: no systemctl, no accounts
  --purge        also remove DIR/conf/, the user '$agent_user' and the group '$token_group'
  --help         show this help
EOF
}

usage_error() {
  echo "uninstall.sh: $*; see --help" >&2
  exit 2
}
die() {
  echo "uninstall.sh: $*" >&2
  exit 1
}
say() { echo "uninstall.sh: $*"; }

prefix=$default_prefix
root=""
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix | --root)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a directory"; fi
      if [ "$1" = --prefix ]; then prefix=$2; else root=$2; fi
      shift 2
      ;;
    --prefix=*) prefix=${1#*=} && shift ;;
    --root=*) root=${1#*=} && shift ;;
    --purge) purge=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done

prefix=${prefix%/}
[[ $prefix =~ ^(/[A-Za-z0-9._+-]+)+$ ]] ||
  usage_error "--prefix must be an absolute path of letters, digits and ._+- other than /, not '$prefix'"
if [ -n "$root" ]; then
  [ -d "$root" ] || die "the staging root '$root' does not exist"
  root="$(cd "$root" && pwd)"
  [ "$root" != / ] || root=""
fi
staged=$root$prefix
units_dir=$root/etc/systemd/system

[ -n "$root" ] || [ "$(id -u)" = 0 ] || die "run as root to remove $prefix (or use --root DIR for a staged tree)"

# Refuse to delete folders under a prefix that install.sh did not make (say, --prefix /usr/local).
if [ -d "$staged" ] && [ ! -f "$staged/$marker_name" ] && [ -n "$(ls -A "$staged")" ]; then
  die "$staged is not a kmsagent install (no $marker_name); nothing removed"
fi

# Stop first, so nothing runs from files about to disappear. Only on a live host with systemd.
live_systemd=0
if [ -z "$root" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  live_systemd=1
  for unit in "${units[@]}"; do
    if systemctl cat "$unit" >/dev/null 2>&1; then
      systemctl disable --now "$unit"
    fi
  done
fi
for unit in "${units[@]}"; do
  if [ -e "$units_dir/$unit" ]; then
    rm -f "$units_dir/$unit"
    say "removed $units_dir/$unit"
  fi
done
[ "$live_systemd" = 0 ] || systemctl daemon-reload
# The token authorises reads of every cached secret: do not leave it behind (it is in /run, so a
# reboot would remove it anyway).
[ -n "$root" ] || rm -f "$token_file"

if [ -d "$staged" ]; then
  rm -rf "${staged:?}/venv" "${staged:?}/bin" "${staged:?}/logs"
  if [ "$purge" = 1 ]; then
    rm -rf "${staged:?}/conf"
    rm -f "$staged/$marker_name"
    rmdir "$staged" 2>/dev/null || say "kept $staged: it holds files install.sh did not make"
    say "removed $staged"
  elif [ -d "$staged/conf" ]; then
    # The marker stays with the config, so that a later --purge may still remove it.
    say "removed $staged except $staged/conf/ (use --purge to remove it too)"
  else
    rm -f "$staged/$marker_name"
    rmdir "$staged" 2>/dev/null || true
    say "removed $staged"
  fi
fi

if [ "$purge" = 1 ]; then
  if [ -n "$root" ]; then
    say "on the target host, also remove the accounts: userdel $agent_user; groupdel $token_group"
  else
    if getent passwd "$agent_user" >/dev/null; then userdel "$agent_user"; fi
    # userdel removes the user's own group only where USERGROUPS_ENAB says so.
    for group in "$agent_user" "$token_group"; do
      if getent group "$group" >/dev/null; then groupdel "$group"; fi
    done
    say "removed the user $agent_user and the group $token_group"
  fi
fi
