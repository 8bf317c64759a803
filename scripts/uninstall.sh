#!/usr/bin/env bash
# Removes what scripts/install.sh made, as its manifest PREFIX/.kmsagent-manifest lists it, and
# nothing else: a file someone else put in PREFIX/bin or PREFIX/logs stays, and so does the folder
# holding it. Keeps the config and the logs (and the accounts) unless --purge, so that a later
# install.sh picks up where this one left off.
set -euo pipefail

readonly default_prefix=/usr/local/alibabacloudkmsagent
readonly token_file=/var/run/kmstoken
readonly agent_user=kmsagent
readonly token_group=kmstokenreader
# shellcheck source=scripts/_prefix.sh
source "$(dirname "${BASH_SOURCE[0]}")/_prefix.sh"

usage() {
  cat <<EOF
Usage: scripts/uninstall.sh [--prefix DIR] [--root DIR] [--no-systemd] [--purge] [--help]

Removes what install.sh made, as DIR/$manifest_name lists it (DIR defaults to
$default_prefix): stops and disables kmsagent.service and kmsagent-token.service (on a
host running systemd), removes their unit files and $token_file, then the venv, the files,
and the folders install.sh made once nothing else is left in them. DIR/conf/kmsagent.toml and
DIR/logs/ stay unless --purge. Files install.sh did not make always stay. Without a manifest it
removes nothing (exit 2).

Options:
  --prefix DIR   the prefix given to install.sh (default $default_prefix)
  --root DIR     remove a tree staged with install.sh --root DIR: no systemctl, no accounts
  --no-systemd   leave the units and systemctl alone; a user other than root removes a user-level
                 install (install.sh --no-systemd) with it
  --purge        also remove the config and the log folder install.sh made, the user '$agent_user'
                 and the group '$token_group'
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
    --purge) purge=1 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) usage_error "unknown option '$1'" ;;
  esac
done

prefix=${prefix%/}
if [ -n "$root" ]; then
  [ -d "$root" ] || die "the staging root '$root' does not exist"
  root=$(realpath -m -- "$root")
  [ "$root" != / ] || root=""
fi
check_prefix "$prefix" "$root"
staged=$root$prefix
manifest=$staged/$manifest_name

# As for install.sh: root, except for a staged tree or (with --no-systemd) a user-level install.
user_uninstall=0
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  [ "$with_systemd" = 0 ] ||
    die "run as root to remove $prefix (or add --no-systemd for a user-level install, or use --root DIR for a staged tree)"
  user_uninstall=1
fi

# No manifest, no guessing: whatever is there was not made by this install.sh.
if [ ! -e "$manifest" ]; then
  hint=""
  if [ -e "$staged/$legacy_marker_name" ]; then
    hint=" (an older install.sh made it: run this checkout's install.sh over it once to write one)"
  fi
  echo "uninstall.sh: no kmsagent install at $staged: it has no $manifest_name$hint; nothing removed" >&2
  exit 2
fi
read_manifest "$manifest" "$prefix" "$root"

# Sort the entries: units (left alone with --no-systemd), what is kept without --purge, the rest.
units=()
removable=()
kept_for_purge=0
prefix_listed=0
for entry in "${manifest_entries[@]}"; do
  case $entry in
    "$prefix") prefix_listed=1 ;;
    "$final_units_dir"/*)
      if [ "$with_systemd" = 1 ]; then
        units+=("$entry")
      elif [ -e "$root$entry" ]; then
        say "left $root$entry alone (--no-systemd)"
      fi
      ;;
    "$prefix/conf" | "$prefix/conf/kmsagent.toml" | "$prefix/logs")
      if [ "$purge" = 1 ]; then
        removable+=("$entry")
      elif [ -e "$root$entry" ]; then
        kept_for_purge=1
      fi
      ;;
    *) removable+=("$entry") ;;
  esac
done

# Stop first, so nothing runs from files about to disappear. Only on a live host with systemd.
live_systemd=0
if [ -z "$root" ] && [ "${#units[@]}" -gt 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  live_systemd=1
  for entry in "${units[@]}"; do
    if systemctl cat "${entry##*/}" >/dev/null 2>&1; then
      systemctl disable --now "${entry##*/}"
    fi
  done
fi
for entry in "${units[@]}"; do
  if [ -e "$root$entry" ] || [ -L "$root$entry" ]; then
    rm -f -- "$root$entry"
    say "removed $root$entry"
  fi
  # The token authorises reads of every cached secret: do not leave it behind (it is in /run, so
  # a reboot would remove it anyway).
  if [ -z "$root" ] && [ "$entry" = "$final_units_dir/kmsagent-token.service" ]; then rm -f "$token_file"; fi
done
[ "$live_systemd" = 0 ] || systemctl daemon-reload

# Files (a symlink is a file: never followed), and the venv whole: pip wrote all of it.
folders=()
for entry in "${removable[@]}"; do
  path=$root$entry
  if [ "$entry" = "$prefix/venv" ] && [ -d "$path" ] && [ ! -L "$path" ]; then
    rm -rf -- "$path"
  elif [ -L "$path" ] || { [ -e "$path" ] && [ ! -d "$path" ]; }; then
    rm -f -- "$path"
  elif [ -d "$path" ]; then
    folders+=("$entry")
  fi
done
# Then folders, deepest first; one still holding something install.sh did not make stays.
while IFS= read -r entry; do
  if [ -n "$entry" ] && ! rmdir -- "$root$entry" 2>/dev/null; then
    say "kept $root$entry: it holds files install.sh did not make"
  fi
done < <(printf '%s\n' "${folders[@]}" | LC_ALL=C sort -r)

# The manifest now lists what is left (for a later --purge or install.sh), or goes with the prefix.
remaining=()
for entry in "${manifest_entries[@]}"; do
  if [ "$entry" != "$prefix" ] && { [ -e "$root$entry" ] || [ -L "$root$entry" ]; }; then
    remaining+=("$entry")
  fi
done
if [ "${#remaining[@]}" = 0 ]; then
  rm -f "$manifest"
  if [ "$prefix_listed" = 0 ]; then
    say "removed kmsagent from $staged"
  elif rmdir -- "$staged" 2>/dev/null; then
    say "removed $staged"
  else
    say "kept $staged: it holds files install.sh did not make"
  fi
else
  if [ "$prefix_listed" = 1 ]; then remaining+=("$prefix"); fi
  write_manifest "$manifest" "${remaining[@]}"
  if [ "$kept_for_purge" = 1 ]; then
    say "removed $staged except its config and logs (use --purge to remove them too)"
  else
    say "removed what install.sh made in $staged, except what is kept above (listed in $manifest)"
  fi
fi

if [ "$purge" = 1 ] && [ "$user_uninstall" = 0 ]; then
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
