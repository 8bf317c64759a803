# shellcheck shell=bash
# Sourced by install.sh and uninstall.sh (which define `die` and `usage_error`): which folders
# kmsagent may be installed into, and the manifest of what install.sh made there. uninstall.sh
# removes what the manifest names and nothing else, so these two rules are all that stand between
# a wrong --prefix and someone else's files.

readonly final_units_dir=/etc/systemd/system
readonly unit_names=(kmsagent.service kmsagent-token.service)
# PREFIX/.kmsagent-manifest: one absolute path per line (as on the target host, never under
# --root), '#' lines are comments. Folders are listed only when install.sh created them.
# shellcheck disable=SC2034 # used by the scripts that source this file
readonly manifest_name=.kmsagent-manifest
# What install.sh wrote before it kept a manifest; it adopts such a tree once (see install.sh).
# shellcheck disable=SC2034
readonly legacy_marker_name=.kmsagent-install
# A manifest has about a dozen lines; a file a thousand times bigger is not one.
readonly manifest_max_bytes=65536

# shared_folder PATH: true when PATH is a folder that other software or a user also keeps files in.
shared_folder() {
  local path=${1%/} home=${HOME:-}
  home=${home%/}
  # Every top-level folder is shared (/usr, /etc, /opt, /home, /root, a mount such as /data).
  [[ $path == /*/* ]] || return 0
  # A home folder.
  if [[ $path == /home/* && $path != /home/*/* ]]; then return 0; fi
  case $path in
    /usr/bin | /usr/games | /usr/include | /usr/lib | /usr/lib32 | /usr/lib64 | /usr/libexec | \
      /usr/local | /usr/sbin | /usr/share | /usr/src | \
      /usr/local/bin | /usr/local/etc | /usr/local/games | /usr/local/include | /usr/local/lib | \
      /usr/local/lib64 | /usr/local/libexec | /usr/local/man | /usr/local/sbin | /usr/local/share | \
      /usr/local/src | \
      /var/cache | /var/lib | /var/local | /var/log | /var/mail | /var/opt | /var/run | /var/spool | \
      /var/tmp | /etc/systemd | /etc/systemd/system)
      return 0
      ;;
  esac
  if [ -n "$home" ]; then
    case $path in
      "$home" | "$home/bin" | "$home/.cache" | "$home/.config" | "$home/.local" | "$home/.local/bin" | \
        "$home/.local/lib" | "$home/.local/share" | "$home/.local/state")
        return 0
        ;;
    esac
  fi
  return 1
}

# check_prefix PREFIX ROOT: exit 2 unless PREFIX (where the files will live) and ROOT+PREFIX
# (where they go now, also with symlinks resolved) are folders of kmsagent's own. The prefix is
# also written into unit files and an awk program: keep it to characters that need no quoting.
check_prefix() {
  local prefix=$1 root=$2 path
  if ! [[ $prefix =~ ^(/[A-Za-z0-9._+-]+)+$ ]] || [[ $prefix/ == */./* || $prefix/ == */../* ]]; then
    usage_error "--prefix must be an absolute path of letters, digits and ._+- without . or .. parts, other than /, not '$prefix'"
  fi
  for path in "$prefix" "$root$prefix" "$(realpath -m -- "$root$prefix")"; do
    if shared_folder "$path"; then
      usage_error "--prefix $prefix${root:+ under --root $root} is $path, a folder shared with other software; choose one of kmsagent's own, such as /opt/kmsagent"
    fi
  done
}

# read_manifest FILE PREFIX ROOT: sets `manifest_entries` to FILE's paths once each is known to
# be PREFIX, a path under it (also once symlinks in its folders are resolved) or one of the units. A manifest
# naming anything else was not written by install.sh (an edit, a copy from another prefix): exit 1
# before anything is changed, so that it can never make uninstall.sh delete /etc.
read_manifest() {
  local file=$1 prefix=$2 root=$3 line inside real_prefix
  manifest_entries=()
  if [ ! -f "$file" ] || [ "$(wc -c <"$file")" -gt "$manifest_max_bytes" ]; then
    die "$file is not a manifest install.sh wrote (not a file, or too large); nothing changed"
  fi
  real_prefix=$(realpath -m -- "$root$prefix")
  while IFS= read -r line || [ -n "$line" ]; do
    case $line in '' | '#'*) continue ;; esac
    inside=0
    if [[ $line =~ ^(/[A-Za-z0-9._+-]+)+$ ]] && [[ $line/ != */./* && $line/ != */../* ]]; then
      # The folder that holds the entry, resolved, must be the one the entry names.
      case $line in
        "$prefix") inside=1 ;;
        "$prefix"/*)
          case $(realpath -m -- "$(dirname -- "$root$line")") in "$real_prefix" | "$real_prefix"/*) inside=1 ;; esac
          ;;
        "$final_units_dir/${unit_names[0]}" | "$final_units_dir/${unit_names[1]}") inside=1 ;;
      esac
    fi
    [ "$inside" = 1 ] ||
      die "$file names $(printf %q "$line"), which is not part of a kmsagent install in $prefix (was the manifest edited?); nothing changed"
    manifest_entries+=("$line")
  done <"$file"
}

# write_manifest FILE PATH...: FILE lists the PATHs, replaced whole by a rename (never half written).
write_manifest() {
  local file=$1
  shift
  {
    echo "# kmsagent: what scripts/install.sh made here; scripts/uninstall.sh removes these and nothing else."
    printf '%s\n' "$@" | LC_ALL=C sort -u
  } >"$file.tmp"
  chmod 0644 "$file.tmp"
  mv -f "$file.tmp" "$file"
}
