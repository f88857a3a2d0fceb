#!/usr/bin/env bash
# install.sh: install npl-agi on an Asterisk PBX, remove it again, or run its demo.
#
#   sudo ./install.sh               install or upgrade (./install.sh --help tells what goes where)
#   sudo ./install.sh --uninstall   remove it (an edited configuration stays unless --purge)
#   ./install.sh --demo             quick start: ./.venv and the demo, no Asterisk or account needed
#
# Safe to rerun: an upgrade replaces the package and the AGI script, but never a configuration
# file or dialplan snippet you edited (the new version is written beside it as *.new).
set -euo pipefail

REPO_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

PREFIX=/opt/npl-agi
AGI_DIR=/var/lib/asterisk/agi-bin
CONF_DIR=/etc/asterisk
CACHE_DIR=/var/lib/asterisk/npl-agi
DESTDIR=
PYTHON=python3
ACTION=install
PURGE=no
DRY_RUN=no
FASTAGI=no
SNIPPETS="npl-lookup.conf npl-outbound.conf npl-routes.conf npl-cdr-custom.conf"

usage() {
    cat <<EOF
Usage: ./install.sh [OPTION]...

Installs npl-agi (number portability lookups for Asterisk) from this source tree:
  PREFIX                   a Python virtual environment with the npl-agi package and command
                           (PREFIX/bin/npl-agi), made with python3 -m venv
  AGI_DIR/npl-lookup.agi   the AGI script; its first line runs PREFIX/bin/python
  CONF_DIR/npl-lookup.conf, npl-outbound.conf, npl-routes.conf
                           dialplan snippets to #include from extensions.conf
  CONF_DIR/npl-cdr-custom.conf
                           the npl_* CDR fields for cdr_custom (#include it in cdr_custom.conf)
  CONF_DIR/npl-agi.conf    the configuration (from npl-agi.conf.sample, with the cache in
                           CACHE_DIR), mode 0640, group asterisk when that group exists; its
                           path is recorded in PREFIX, so the AGI script and the npl-agi
                           command find it without \$NPL_AGI_CONFIG
  CONF_DIR/npl-agi.installed
                           checksums of the files as installed, so that a rerun (even after
                           --uninstall) tells your edits from its own versions
  CACHE_DIR                the lookup cache and the account lock file, setgid, mode 2770,
                           owned by the user asterisk when it exists
Rerunning upgrades the package and the AGI script. A configuration file or snippet that was
edited since it was installed is kept; only when the shipped version changed is the new
version written beside it as FILE.new.

Options:
  --prefix DIR     virtual environment (default: $PREFIX)
  --agi-dir DIR    Asterisk's AGI directory, astagidir (default: $AGI_DIR)
  --conf-dir DIR   Asterisk's configuration directory (default: $CONF_DIR)
  --cache-dir DIR  the lookup cache and lock directory, written into npl-agi.conf
                   (default: $CACHE_DIR)
  --python PY      Python 3.11 or newer that creates the environment (default: $PYTHON)
  --destdir DIR    stage the installation under DIR: every path written is DIR followed by
                   its final path, e.g. DIR/etc/asterisk/npl-agi.conf. A path given that is
                   already under DIR is used as it is. Scripts are made to run from their final
                   paths (a packager's stage: the virtual environment is not usable before it
                   is copied there), except with a --prefix under DIR: then the stage works
                   where it is, e.g. for tests:
                     ./install.sh --destdir /tmp/stage --prefix /tmp/stage/opt/npl-agi
  --uninstall      remove what install.sh installed; configuration files and snippets that
                   were edited are kept
  --purge          with --uninstall: remove edited files and the lookup cache too
  --fastagi        also install the FastAGI server (npl-agi serve) as the systemd service
                   npl-agi-fastagi (user asterisk, hardened), enable and start it; with
                   --uninstall, stop and remove it
  --dry-run        show what would be done; change nothing
  --demo           the README quick start: create ./.venv in this source tree with the test
                   extras (pip install -e '.[test]'), then run .venv/bin/npl-agi demo and
                   exit with its status. Needs no Asterisk, no account and no root, except
                   that root installs python3-venv first on Debian when it is missing, and
                   redis-server and openssl for the tests.
  -h, --help       show this help

Exit status: 0 done, 1 failed, 2 bad usage; with --demo, the demo's own status.
EOF
}

say() { printf 'npl-agi: %s\n' "$*"; }
# The outcome of a change (with --dry-run, act has shown the command instead).
did() {
    if [ "$DRY_RUN" = no ]; then
        say "$*"
    fi
}
die() {
    printf 'npl-agi: error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'npl-agi: %s (see ./install.sh --help)\n' "$*" >&2
    exit 2
}

# Run a command that changes the system; with --dry-run only show it.
act() {
    if [ "$DRY_RUN" = yes ]; then
        printf 'npl-agi: would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

absolute() {
    case $1 in
    /*) printf '%s\n' "${1%/}" ;;
    *) printf '%s\n' "$PWD/${1%/}" ;;
    esac
}

# Where a path is written: under DESTDIR unless it is there already.
staged() {
    if [ -z "$DESTDIR" ] || [ "$1" = "$DESTDIR" ] || [ "${1#"$DESTDIR"/}" != "$1" ]; then
        printf '%s\n' "$1"
    else
        printf '%s\n' "$DESTDIR$1"
    fi
}

is_root() { [ "$(id -u)" -eq 0 ]; }

file_sum() { sha256sum -- "$1" | cut -d ' ' -f 1; }

parse_args() {
    local opt value
    while [ $# -gt 0 ]; do
        opt=$1
        case $opt in
        --prefix=* | --agi-dir=* | --conf-dir=* | --cache-dir=* | --destdir=* | --python=*)
            value=${opt#*=}
            opt=${opt%%=*}
            shift
            ;;
        --prefix | --agi-dir | --conf-dir | --cache-dir | --destdir | --python)
            [ $# -ge 2 ] || usage_error "$opt needs a value"
            value=$2
            shift 2
            ;;
        --uninstall | --demo)
            ACTION=${opt#--}
            shift
            continue
            ;;
        --purge)
            PURGE=yes
            shift
            continue
            ;;
        --dry-run)
            DRY_RUN=yes
            shift
            continue
            ;;
        --fastagi)
            FASTAGI=yes
            shift
            continue
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) usage_error "unknown option: $opt" ;;
        esac
        [ -n "$value" ] || usage_error "$opt needs a value"
        case $opt in
        --prefix) PREFIX=$(absolute "$value") ;;
        --agi-dir) AGI_DIR=$(absolute "$value") ;;
        --conf-dir) CONF_DIR=$(absolute "$value") ;;
        --cache-dir) CACHE_DIR=$(absolute "$value") ;;
        --destdir) DESTDIR=$(absolute "$value") ;;
        --python) PYTHON=$value ;;
        esac
    done
    if [ "$PURGE" = yes ] && [ "$ACTION" != uninstall ]; then
        usage_error "--purge goes with --uninstall"
    fi
    if [ -z "$PREFIX" ]; then
        usage_error "--prefix must not be /"
    fi
}

python_usable() {
    command -v "$PYTHON" >/dev/null 2>&1 &&
        "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

apt_install() {
    if ! act env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; then
        # A fresh system may have no package lists yet.
        act apt-get update -q
        act env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
    fi
}

# The programs the test suite starts: redis-server for the shared cache, openssl for a TLS
# certificate. Root on Debian gets them installed; anyone else is told.
need_test_programs() {
    local missing=() program
    for program in redis-server openssl; do
        command -v "$program" >/dev/null 2>&1 || missing+=("$program")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if is_root && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} with apt-get (the tests start them)"
        apt_install "${missing[@]}"
    else
        say "note: the tests need ${missing[*]}: apt-get install ${missing[*]}  (as root)"
    fi
}

# python3 -m venv needs the venv and ensurepip modules; Debian ships them as python3-venv.
need_python() {
    python_usable && return 0
    if command -v "$PYTHON" >/dev/null 2>&1 &&
        ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        die "npl-agi needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)"
    fi
    if [ "$PYTHON" = python3 ] && command -v apt-get >/dev/null 2>&1; then
        if ! is_root; then
            die "python3 -m venv is not available here: install it with  apt-get install python3-venv  (as root), then rerun"
        fi
        say "python3 -m venv is not available: installing python3-venv with apt-get"
        apt_install python3-venv
        [ "$DRY_RUN" = yes ] || python_usable || die "python3 -m venv still fails after installing python3-venv"
        return 0
    fi
    die "$PYTHON with the venv module (Python 3.11 or newer) is needed; on Debian: apt-get install python3-venv"
}

# Paths and the manifest: the checksum of every file as installed, so that a rerun can tell
# an unedited old version (upgraded in place) from an edited one (kept), and a shipped version
# that changed (written as FILE.new) from one that did not. It lives beside the configuration,
# not in PREFIX, so that it outlasts --uninstall for as long as an edited file stays.
setup_paths() {
    VENV=$(staged "$PREFIX")
    MANIFEST=$(staged "$CONF_DIR")/npl-agi.installed
    AGI_DEST=$(staged "$AGI_DIR")/npl-lookup.agi
    local old=$VENV/share/npl-agi/manifest # where versions before 0.2 kept it
    if [ ! -f "$MANIFEST" ] && [ -f "$old" ] && [ "$DRY_RUN" = no ]; then
        mkdir -p "$(dirname "$MANIFEST")"
        cp -- "$old" "$MANIFEST"
    fi
}

# Where an installed program finds a path: its staged place when the stage works where it is
# (a --prefix under --destdir), else its final place.
runtime_path() {
    if [ "$VENV" = "$PREFIX" ]; then
        staged "$1"
    else
        printf '%s\n' "$1"
    fi
}

recorded_sum() {
    [ -f "$MANIFEST" ] || return 0
    awk -F '\t' -v path="$1" '$2 == path { sum = $1 } END { if (sum) print sum }' "$MANIFEST"
}

record_sum() {
    [ "$DRY_RUN" = no ] || return 0
    mkdir -p "$(dirname "$MANIFEST")"
    {
        if [ -f "$MANIFEST" ]; then # in place, so that a rerun writes the same file
            awk -F '\t' -v path="$1" -v sum="$2" '
                $2 == path { print sum "\t" path; found = 1; next }
                { print }
                END { if (!found) print sum "\t" path }
            ' "$MANIFEST"
        else
            printf '# npl-agi install.sh: checksums of the files it installed (keep this file)\n'
            printf '%s\t%s\n' "$2" "$1"
        fi
    } >"$MANIFEST.tmp"
    mv -f "$MANIFEST.tmp" "$MANIFEST"
}

# After --uninstall: keep the checksums of the files that stayed (edited), drop the rest, and
# the manifest itself once nothing it lists is left.
prune_manifest() {
    local sum path kept=()
    [ -f "$MANIFEST" ] || return 0
    if [ "$PURGE" = no ]; then
        while IFS=$'\t' read -r sum path; do
            case $sum in '#'* | '') continue ;; esac
            [ -e "$(staged "$path")" ] && kept+=("$sum"$'\t'"$path")
        done <"$MANIFEST"
    fi
    if [ ${#kept[@]} -eq 0 ]; then
        act rm -f -- "$MANIFEST"
        did "removed $MANIFEST"
    elif [ "$DRY_RUN" = no ]; then
        {
            printf '# npl-agi install.sh: checksums of the files it installed (keep this file)\n'
            printf '%s\n' "${kept[@]}"
        } >"$MANIFEST.tmp"
        mv -f "$MANIFEST.tmp" "$MANIFEST"
        say "kept the checksums of your edited files in $MANIFEST (a reinstall then writes no needless *.new)"
    fi
}

put_file() { # SRC DEST MODE [GROUP]
    if [ -n "${4:-}" ]; then
        act install -m "$3" -g "$4" "$1" "$2"
    else
        act install -m "$3" "$1" "$2"
    fi
}

# A file the admin may edit: installed once, upgraded while unedited, never overwritten after.
install_conffile() { # SRC FINAL_PATH MODE [GROUP]
    local src=$1 final=$2 mode=$3 group=${4:-} dest new old recorded
    dest=$(staged "$final")
    new=$(file_sum "$src")
    act mkdir -p "$(dirname "$dest")"
    if [ ! -e "$dest" ]; then
        put_file "$src" "$dest" "$mode" "$group"
        record_sum "$final" "$new"
        did "installed $dest"
        return 0
    fi
    old=$(file_sum "$dest")
    recorded=$(recorded_sum "$final")
    if [ "$old" = "$new" ]; then
        record_sum "$final" "$new"
        say "unchanged $dest"
    elif [ -n "$recorded" ] && [ "$old" = "$recorded" ]; then
        put_file "$src" "$dest" "$mode" "$group"
        record_sum "$final" "$new"
        did "updated $dest"
    elif [ -e "$dest.new" ] && [ "$(file_sum "$dest.new")" = "$new" ]; then
        record_sum "$final" "$new"
        say "your edited $dest stays; the new version is in $dest.new"
    elif [ "$recorded" = "$new" ]; then
        say "your edited $dest stays (the shipped version has not changed)"
    else
        put_file "$src" "$dest.new" "$mode" "$group"
        record_sum "$final" "$new" # offered once: no second .new after a merge
        say "your edited $dest stays; the new version goes to $dest.new: compare and merge"
    fi
}

# The example configuration as installed: the cache (and with it the lock file) in CACHE_DIR.
render_config() { # OUT
    CACHE_PATH=$(runtime_path "$CACHE_DIR")/cache.sqlite awk '
        /^\[/ { section = $0 }
        section == "[cache]" && /^path[ \t]*=/ { print "path = " ENVIRON["CACHE_PATH"]; next }
        { print }
    ' "$REPO_DIR/npl-agi.conf.sample" >"$1"
}

# Tell the installed programs where their configuration is: a file in the environment that
# npl_agi.config reads when neither --config nor $NPL_AGI_CONFIG names one.
record_config_path() {
    local record=$VENV/share/npl-agi/config-path want
    want=$(runtime_path "$CONF_DIR/npl-agi.conf")
    if [ -f "$record" ] && [ "$(cat "$record")" = "$want" ]; then
        say "unchanged $record"
    elif [ "$DRY_RUN" = yes ]; then
        say "would record $want in $record"
    else
        mkdir -p "$(dirname "$record")"
        printf '%s\n' "$want" >"$record"
        say "recorded $want in $record (read by npl-lookup.agi and npl-agi)"
    fi
}

# The cache and lock directory: setgid and group-writable, so that what Asterisk and an admin
# running npl-agi as root create there stays writable by both.
make_cache_dir() {
    local cache
    cache=$(staged "$CACHE_DIR")
    if [ -d "$cache" ]; then
        say "unchanged $cache"
    else
        act mkdir -p "$cache"
        did "created $cache"
    fi
    if is_root && id asterisk >/dev/null 2>&1; then
        act chown asterisk:"$(id -gn asterisk)" "$cache"
        # Files an older version (or a root lookup) left: Asterisk's group writes them too.
        if [ -n "$(ls -A "$cache" 2>/dev/null)" ]; then
            act chgrp -R -- "$(id -gn asterisk)" "$cache"
            act chmod -R g+rw -- "$cache"
        fi
    elif [ -z "$DESTDIR" ]; then
        say "no user asterisk: give $cache the group Asterisk runs as (chgrp); it is setgid, so its files follow"
    fi
    act chmod 2770 "$cache"
}

# A staged virtual environment for another final place: scripts must name the final paths.
relocate_venv() {
    [ "$VENV" != "$PREFIX" ] || return 0
    if [ "$DRY_RUN" = yes ]; then
        say "would rewrite the paths in $VENV/bin from $VENV to $PREFIX"
        return 0
    fi
    "$VENV/bin/python" - "$VENV" "$PREFIX" <<'PY'
import os
import sys

staged, final = (p.encode() for p in sys.argv[1:3])
bindir = os.path.join(sys.argv[1], "bin")
for name in sorted(os.listdir(bindir)):
    path = os.path.join(bindir, name)
    if os.path.islink(path) or not os.path.isfile(path):
        continue
    with open(path, "rb") as f:
        data = f.read()
    if staged in data and b"\0" not in data:
        with open(path, "wb") as f:
            f.write(data.replace(staged, final))
PY
    say "made the scripts in $VENV/bin run from $PREFIX"
}

# Fail early and clearly when a target cannot be written (forgot sudo?).
need_writable() {
    local path dir
    for path in "$@"; do
        dir=$(staged "$path")
        while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
        if [ ! -w "$dir" ]; then
            die "cannot write $dir (for $(staged "$path")): run as root (sudo), or stage the files with --destdir"
        fi
    done
}

asterisk_present() {
    command -v asterisk >/dev/null 2>&1 || [ -x /usr/sbin/asterisk ]
}

do_install() {
    local group="" snippet src config
    if [ ! -f "$REPO_DIR/pyproject.toml" ] || [ ! -d "$REPO_DIR/dialplan" ]; then
        die "$REPO_DIR is not the npl-agi source tree"
    fi
    need_python
    setup_paths
    [ "$DRY_RUN" = yes ] || need_writable "$PREFIX" "$AGI_DIR" "$CONF_DIR" "$CACHE_DIR"
    if [ -z "$DESTDIR" ] && ! asterisk_present; then
        say "Asterisk is not installed on this machine: installing npl-agi anyway (the npl-agi"
        say "command works without it; the AGI script and snippets take effect once it is here)"
    fi

    if [ -f "$VENV/pyvenv.cfg" ] && "$VENV/bin/python" -c '' >/dev/null 2>&1; then
        say "using the virtual environment $VENV"
    elif [ -f "$VENV/pyvenv.cfg" ]; then
        # Its Python is gone (e.g. removed by a distribution upgrade): build it again.
        act "$PYTHON" -m venv --clear "$VENV"
        did "recreated the virtual environment $VENV (its Python no longer ran)"
    elif [ -d "$VENV" ] && [ -n "$(ls -A "$VENV")" ]; then
        die "$VENV exists and is not a virtual environment: choose another --prefix"
    else
        act "$PYTHON" -m venv "$VENV"
        did "created the virtual environment $VENV"
    fi
    act "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$REPO_DIR"
    did "installed the npl-agi package into $VENV"
    relocate_venv
    record_config_path

    src=$VENV/bin/npl-lookup.agi
    act mkdir -p "$(dirname "$AGI_DEST")"
    if [ -f "$AGI_DEST" ] && [ -f "$src" ] && cmp -s "$src" "$AGI_DEST"; then
        say "unchanged $AGI_DEST"
    else
        act install -m 0755 "$src" "$AGI_DEST"
        did "installed $AGI_DEST"
    fi
    if [ "$DRY_RUN" = no ]; then
        record_sum "$AGI_DIR/npl-lookup.agi" "$(file_sum "$AGI_DEST")"
    fi

    for snippet in $SNIPPETS; do
        install_conffile "$REPO_DIR/dialplan/$snippet" "$CONF_DIR/$snippet" 0644
    done

    if is_root && command -v getent >/dev/null 2>&1 && getent group asterisk >/dev/null; then
        group=asterisk
    fi
    config=$(mktemp)
    render_config "$config"
    install_conffile "$config" "$CONF_DIR/npl-agi.conf" 0640 "$group"
    rm -f -- "$config"
    if [ -z "$group" ] && [ -z "$DESTDIR" ]; then
        say "no group asterisk: make $CONF_DIR/npl-agi.conf readable by the user Asterisk runs as"
    fi

    make_cache_dir

    if [ "$DRY_RUN" = yes ]; then
        say "dry run: nothing was changed"
        return 0
    fi
    if [ -n "$DESTDIR" ]; then
        say "done: staged under $DESTDIR"
        return 0
    fi
    cat <<EOF
npl-agi: done. Next steps:
  1. Put your account in $CONF_DIR/npl-agi.conf ([api] user and password) and check it:
       $PREFIX/bin/npl-agi check
  2. Add at the end of $CONF_DIR/extensions.conf:
       #include npl-lookup.conf
       #include npl-outbound.conf
       #include npl-routes.conf
     set your trunks in npl-routes.conf, then:  asterisk -rx 'dialplan reload'
  3. CDR fields: add  #include npl-cdr-custom.conf  at the end of $CONF_DIR/cdr_custom.conf
     (and unanswered = yes in cdr.conf), then:  asterisk -rx 'module reload cdr_custom.so'
  4. Try a lookup as Asterisk would:  $PREFIX/bin/npl-agi lookup 07788450450
EOF
}

# Remove a file install_conffile installed, unless it was edited (or --purge).
remove_conffile() { # SRC FINAL_PATH
    local src=$1 final=$2 dest sum
    dest=$(staged "$final")
    if [ -e "$dest.new" ]; then
        act rm -f -- "$dest.new"
        did "removed $dest.new"
    fi
    [ -e "$dest" ] || return 0
    sum=$(file_sum "$dest")
    if [ "$PURGE" = yes ] || [ "$sum" = "$(recorded_sum "$final")" ] ||
        { [ -f "$src" ] && [ "$sum" = "$(file_sum "$src")" ]; }; then
        act rm -f -- "$dest"
        did "removed $dest"
    else
        say "your edited $dest stays (--purge removes it)"
    fi
}

do_uninstall() {
    local snippet cache config
    setup_paths
    if [ -e "$AGI_DEST" ]; then
        if [ "$(file_sum "$AGI_DEST")" = "$(recorded_sum "$AGI_DIR/npl-lookup.agi")" ] ||
            [ "$PURGE" = yes ] || case $(head -n 1 "$AGI_DEST") in "#!$PREFIX/bin/"*) true ;; *) false ;; esac then
            act rm -f -- "$AGI_DEST"
            did "removed $AGI_DEST"
        else
            say "$AGI_DEST stays: install.sh did not install it"
        fi
    fi
    for snippet in $SNIPPETS; do
        remove_conffile "$REPO_DIR/dialplan/$snippet" "$CONF_DIR/$snippet"
    done
    config=$(mktemp)
    render_config "$config"
    remove_conffile "$config" "$CONF_DIR/npl-agi.conf"
    rm -f -- "$config"
    prune_manifest

    cache=$(staged "$CACHE_DIR")
    if [ -d "$cache" ]; then
        if [ "$PURGE" = yes ]; then
            act rm -rf -- "$cache"
            did "removed $cache"
        elif [ -z "$(ls -A "$cache")" ]; then
            act rmdir -- "$cache"
            did "removed $cache"
        else
            say "the lookup cache $cache stays (--purge removes it)"
        fi
    fi

    if [ -f "$VENV/pyvenv.cfg" ]; then
        act rm -rf -- "$VENV"
        did "removed $VENV"
    elif [ -e "$VENV" ]; then
        say "$VENV stays: it is not a virtual environment"
    fi
    if [ "$DRY_RUN" = yes ]; then
        say "dry run: nothing was changed"
        return 0
    fi
    say "done. Remove the #include lines of npl-*.conf from extensions.conf, then run"
    say "  asterisk -rx 'dialplan reload'"
}

do_demo() {
    local venv=$REPO_DIR/.venv
    [ -f "$REPO_DIR/pyproject.toml" ] || die "$REPO_DIR is not the npl-agi source tree"
    need_python
    if [ -f "$venv/pyvenv.cfg" ] && "$venv/bin/python" -c '' >/dev/null 2>&1; then
        say "using $venv"
    else
        act "$PYTHON" -m venv --clear "$venv"
        did "created $venv"
    fi
    (cd "$REPO_DIR" && act "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]')
    need_test_programs
    say "running .venv/bin/npl-agi demo"
    if [ "$DRY_RUN" = yes ]; then
        act "$venv/bin/npl-agi" demo
        return 0
    fi
    exec "$venv/bin/npl-agi" demo
}

# The FastAGI server's systemd unit (--fastagi), with this installation's paths.
UNIT=npl-agi-fastagi.service
UNIT_DIR=/etc/systemd/system

systemd_running() {
    [ -z "$DESTDIR" ] && [ "$DRY_RUN" = no ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

install_fastagi() {
    local dest tmp
    dest=$(staged "$UNIT_DIR")/$UNIT
    tmp=$(mktemp)
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONF_DIR@|$CONF_DIR|g" -e "s|@CACHE_DIR@|$CACHE_DIR|g" \
        "$REPO_DIR/systemd/$UNIT" >"$tmp"
    act mkdir -p "$(dirname "$dest")"
    act install -m 0644 "$tmp" "$dest"
    rm -f "$tmp"
    did "installed $dest"
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now "$UNIT"
        say "started $UNIT; check it with: systemctl status $UNIT"
    else
        say "enable it where systemd runs: systemctl daemon-reload && systemctl enable --now $UNIT"
    fi
    say "then route lookups through it: NPL_FASTAGI=agi://127.0.0.1:4573 in [globals] of extensions.conf"
}

uninstall_fastagi() {
    local dest
    dest=$(staged "$UNIT_DIR")/$UNIT
    [ -e "$dest" ] || return 0
    if systemd_running; then
        systemctl disable --now "$UNIT" || true
    fi
    act rm -f -- "$dest"
    did "removed $dest"
    if systemd_running; then
        systemctl daemon-reload
    fi
}

parse_args "$@"
case $ACTION in
install)
    do_install
    [ "$FASTAGI" = no ] || install_fastagi
    ;;
uninstall)
    [ "$FASTAGI" = no ] || uninstall_fastagi
    do_uninstall
    ;;
demo) do_demo ;;
esac
