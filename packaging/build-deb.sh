#!/bin/sh
# Build the kv-agent and kv-agent-emulator .debs from this source tree with
# the standard Debian tools, on Debian 12 / Ubuntu 22.04 or later:
#
#   apt-get install --no-install-recommends dpkg-dev debhelper dh-python python3
#   packaging/build-deb.sh [OUTDIR]          # default OUTDIR: ./dist
#
# The Debian packaging lives in packaging/debian; dpkg-buildpackage wants it
# at debian/ in the tree it builds, so this copies the files the package is
# made of (symlinks in packaging/debian resolved) into a scratch directory and
# builds there: the work tree is never written to. The maintainer comes from
# pyproject.toml (packaging/maintainer), kv-agent(8) from the parser
# (packaging/manpage.py). Prints the paths of the two .debs,
# one a line: kv-agent's, then kv-agent-emulator's.
#
# KV_AGENT_BUILD_VERSION=0.0.9 builds the same tree as that version (the
# changelog's and the agent's own, which `kv-agent status` shows): the
# upgrade test's "previous release" (tests/system/test_nspawn_upgrade.py).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$here/dist"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
maintainer=$("$here/packaging/maintainer")

scratch=$(mktemp -d "${TMPDIR:-/tmp}/kv-agent-deb.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
# The maintainer (debian/control, debian/changelog) is pyproject.toml's author.
cp -RL "$here/packaging/debian" "$scratch/debian"
for file in control changelog; do
    sed "s|@MAINTAINER@|$maintainer|g" "$here/packaging/debian/$file" >"$scratch/debian/$file"
done
if [ -n "${KV_AGENT_BUILD_VERSION:-}" ]; then
    sed -i "1s/([^)]*)/($KV_AGENT_BUILD_VERSION)/" "$scratch/debian/changelog"
fi
version=$(dpkg-parsechangelog -l "$scratch/debian/changelog" -S Version)
src="$scratch/kv-agent-$version"
mkdir -p "$src"
(cd "$here" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' \
    agent systemd packaging README.md pyproject.toml) | tar -xf - -C "$src"
if [ -n "${KV_AGENT_BUILD_VERSION:-}" ]; then
    sed -i "s/^__version__ = .*/__version__ = \"$version\"/" "$src/agent/__init__.py"
fi
# kv-agent(8) is made from the command line's own parser (packaging/manpage.py),
# so it cannot drift from the code; debian/kv-agent.manpages installs it.
python3 -I "$src/packaging/manpage.py" -o "$src/packaging/kv-agent.8"
rm -rf "$src/packaging/debian"
mv "$scratch/debian" "$src/debian"

# -b: binary only (the source package is this repository); -us -uc: unsigned.
(cd "$src" && dpkg-buildpackage -b -us -uc >"$scratch/build.log" 2>&1) || {
    cat "$scratch/build.log" >&2
    exit 1
}
for file in "$scratch"/*.deb "$scratch"/*.buildinfo "$scratch"/*.changes; do
    cp "$file" "$out/"
done
echo "$out/kv-agent_${version}_all.deb"
echo "$out/kv-agent-emulator_${version}_all.deb"
