#!/usr/bin/env bash
# Prepare, or reuse when it is already there, a Debian root holding PostgreSQL <major>
# (17 from trixie, 18 from forky) with wal2json and the extension build tools; print its path.
#   scripts/pgroot.sh 17        -> /var/lib/bemi-pg/roots/pg17 (BEMI_PG_ROOTS overrides the parent)
# The test harness runs the server binaries inside it via chroot as its `postgres` user, over TCP
# on 127.0.0.1 (tests/README: BEMI_PG_ROOT). No service is started in the root, and Debian's
# automatic `main` cluster is not created.
set -euo pipefail

major=${1:-}
case "$major" in
  17) suite=trixie ;;
  18) suite=forky ;;
  *) echo "error: no Debian root for PostgreSQL '${major}'; use 17 (trixie) or 18 (forky); 15 is the host's own" >&2; exit 2 ;;
esac
mirror=${BEMI_PG_MIRROR:-http://deb.debian.org/debian}
parent=${BEMI_PG_ROOTS:-/var/lib/bemi-pg/roots}
root="$parent/pg$major"
packages="postgresql-$major postgresql-$major-wal2json postgresql-$major-cron postgresql-server-dev-$major make"

if [ -f "$root/.bemi-pg-ready" ]; then echo "$root"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "error: preparing $root needs root (debootstrap, chroot); run: sudo $0 $major" >&2; exit 1; fi
# One preparation of a root at a time (.ci/run's two lanes both ask for 18): a second caller
# waits for the first and then finds the root ready.
mkdir -p "$parent"
exec 9>"$parent/.pg$major.lock"
flock 9
if [ -f "$root/.bemi-pg-ready" ]; then echo "$root"; exit 0; fi
# Two roots may be prepared at once (.ci/run): one installs debootstrap while the other waits
# for it, instead of both taking apt's lock and one failing.
if ! command -v debootstrap >/dev/null; then
  flock "$parent/.debootstrap-install.lock" sh -c 'command -v debootstrap >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }'
  command -v debootstrap >/dev/null || { echo "error: could not install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
fi
# An older debootstrap has no script for the newest suite; `sid` bootstraps any testing suite.
script=/usr/share/debootstrap/scripts/$suite
[ -f "$script" ] || script=/usr/share/debootstrap/scripts/sid

work="$root.partial"
cleanup() { umount "$work/proc" 2>/dev/null || true; }
trap cleanup EXIT
umount "$work/proc" 2>/dev/null || true
rm -rf "$work"
mkdir -p "$work"
echo "pgroot: debootstrap $suite into $work" >&2
debootstrap --variant=minbase "$suite" "$work" "$mirror" "$script" >"$parent/pg$major.debootstrap.log" 2>&1 \
  || { echo "error: debootstrap $suite failed; see $parent/pg$major.debootstrap.log" >&2; exit 1; }

# No service starts in the root; a testing suite's Release file may be past its Valid-Until.
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 755 "$work/usr/sbin/policy-rc.d"
echo 'Acquire::Check-Valid-Until "false";' >"$work/etc/apt/apt.conf.d/99bemi-pg"
mkdir -p "$work/etc/postgresql-common"
echo 'create_main_cluster = false' >"$work/etc/postgresql-common/createcluster.conf"

mount -t proc proc "$work/proc"
echo "pgroot: installing $packages" >&2
chroot "$work" /usr/bin/env DEBIAN_FRONTEND=noninteractive sh -c \
  "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages" \
  >"$parent/pg$major.apt.log" 2>&1 \
  || { echo "error: installing $packages in $work failed; see $parent/pg$major.apt.log" >&2; exit 1; }
chroot "$work" apt-get clean
umount "$work/proc"
chroot "$work" /usr/lib/postgresql/"$major"/bin/postgres --version >&2
touch "$work/.bemi-pg-ready"
rm -rf "$root"
mv "$work" "$root"
echo "$root"
