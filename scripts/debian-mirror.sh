#!/usr/bin/env bash
# Print the Debian mirror this machine's apt uses, for debootstrap: scripts/debian-mirror.sh [ROOT]
# ARSERVICE_DEBIAN_MIRROR wins. Else, of the apt sources (ROOT/etc/apt/sources.list, then
# ROOT/etc/apt/sources.list.d/*.list and *.sources, the deb822 format, in apt's order), the first
# entry with component main and suite bookworm (or, on a Debian host, the host's own release) whose
# dists/bookworm/Release says Origin: Debian: a machine behind its own mirror bootstraps from it,
# and a third-party repository that names the same suite (docker's, sury's) is passed over.
set -euo pipefail

root=${1:-}
if [ -n "${ARSERVICE_DEBIAN_MIRROR:-}" ]; then
  echo "$ARSERVICE_DEBIAN_MIRROR"
  exit 0
fi

# Every enabled `deb` entry with component main as "URI SUITE" lines, in the order apt reads them.
entries() {
  local f
  for f in "$root"/etc/apt/sources.list "$root"/etc/apt/sources.list.d/*; do
    [ -f "$f" ] || continue
    case $f in
      *.list) # deb [options] URI SUITE COMPONENT...
        sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]*\)\?\([^[:space:]]\+\)[[:space:]]\+\([^[:space:]]\+\)[[:space:]].*\<main\>.*/\2 \3/p' "$f" ;;
      *.sources) sources822 "$f" ;;
    esac
  done
}

# The deb822 format: stanzas of "Field: value" lines, a value continued on indented lines.
sources822() {
  awk '
    function flush(   i, j, n, m, S, U) {
      if (types ~ /(^|[ \t])deb([ \t]|$)/ && components ~ /(^|[ \t])main([ \t]|$)/ && enabled != "no") {
        n = split(suites, S); m = split(uris, U)
        for (j = 1; j <= m; j++) for (i = 1; i <= n; i++) print U[j], S[i]
      }
      types = uris = suites = components = enabled = field = ""
    }
    /^#/ { next }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]/ {  # a field continued on the next line
      if (field == "uris") uris = uris " " $0; else if (field == "suites") suites = suites " " $0
      else if (field == "components") components = components " " $0
      next
    }
    {
      field = tolower(substr($0, 1, index($0, ":") - 1)); value = substr($0, index($0, ":") + 1)
      if (field == "types") types = value
      else if (field == "uris") uris = value
      else if (field == "suites") suites = value
      else if (field == "components") components = value
      else if (field == "enabled") { enabled = tolower(value); gsub(/[ \t]/, "", enabled) }
    }
    END { flush() }' "$1"
}

codename=$(. "$root/etc/os-release" 2>/dev/null && [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}") || true
while read -r uri suite; do
  [ "$suite" = bookworm ] || [ "$suite" = "${codename:-bookworm}" ] || continue
  uri=${uri%/}
  release=$(curl -fsS -r 0-4095 --max-time 20 "$uri/dists/bookworm/Release" 2>/dev/null) || continue
  if grep -q '^Origin: Debian$' <<<"$release"; then
    echo "$uri"
    exit 0
  fi
done < <(entries)

echo "debian-mirror: no Debian archive serving bookworm in $root/etc/apt/sources.list{,.d};" \
     "set ARSERVICE_DEBIAN_MIRROR=http://<mirror>/debian" >&2
exit 1
