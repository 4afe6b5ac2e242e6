#!/bin/sh
# Build the kv-agent and kv-agent-emulator RPMs (noarch) from this source
# tree with rpmbuild:
#
#   on RHEL 9 / Azure Linux:  dnf install rpm-build python3-devel systemd-rpm-macros
#   on Debian / Ubuntu:       apt-get install --no-install-recommends rpm
#   packaging/build-rpm.sh [OUTDIR]          # default OUTDIR: ./dist
#
# Makes Source0 (kv-agent-VERSION.tar.gz) from the files the package is made
# of, then runs rpmbuild -bb in a scratch _topdir. On a host whose rpm has no
# systemd macros or RPM database of build dependencies (Debian), it loads
# packaging/rpm/macros.fallback and skips the BuildRequires check (--nodeps).
# The packager comes from pyproject.toml (packaging/maintainer), kv-agent(8)
# from the parser (packaging/manpage.py). Prints the
# paths of the two .rpms, one a line: kv-agent's, then kv-agent-emulator's.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$here/dist"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
maintainer=$("$here/packaging/maintainer")

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kv-agent-rpm.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
# Packager: and %changelog name pyproject.toml's author.
spec="$scratch/kv-agent.spec"
sed "s|@MAINTAINER@|$maintainer|g" "$here/packaging/rpm/kv-agent.spec" >"$spec"
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
mkdir -p "$scratch/SOURCES" "$scratch/kv-agent-$version"
(cd "$here" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' \
    agent systemd packaging README.md pyproject.toml) | tar -xf - -C "$scratch/kv-agent-$version"
# kv-agent(8) is made from the command line's own parser (packaging/manpage.py),
# so it cannot drift from the code; the spec installs it.
python3 -I "$scratch/kv-agent-$version/packaging/manpage.py" \
    -o "$scratch/kv-agent-$version/packaging/kv-agent.8"
tar -czf "$scratch/SOURCES/kv-agent-$version.tar.gz" -C "$scratch" "kv-agent-$version"

set -- --define "_topdir $scratch" --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm"
if [ "$(rpm --eval '%{?systemd_post:1}')" != 1 ]; then
    # rpm on Debian: add the fallback macros to the system's own.
    set -- "$@" --load "$here/packaging/rpm/macros.fallback" --nodeps
fi
rpmbuild -bb "$@" "$spec" >"$scratch/build.log" 2>&1 || {
    cat "$scratch/build.log" >&2
    exit 1
}
for name in kv-agent kv-agent-emulator; do
    ls "$out/$name-$version"-*.noarch.rpm | tail -n 1
done
