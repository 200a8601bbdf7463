# Sourced by the image builders: pick the Debian mirrors apt on this machine
# already uses (the only reachable ones on a closed network). deb822 (.sources)
# and one-line (.list) formats are both read; PAYGRESS_DEBIAN_MIRROR and
# PAYGRESS_DEBIAN_SECURITY_MIRROR override them.
detect_mirror() { # $1 = "debian" or "debian-security"
  local want="$1" uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -v '^[[:space:]]*#' \
    | grep -oE '(https?|file)://[^[:space:]]+' \
    | sed 's:/*$::' \
    | grep -E "/${want}\$" | head -n1 || true)
  printf '%s' "${uri:-http://deb.debian.org/${want}}"
}
MIRROR="${PAYGRESS_DEBIAN_MIRROR:-$(detect_mirror debian)}"
SECURITY_MIRROR="${PAYGRESS_DEBIAN_SECURITY_MIRROR:-$(detect_mirror debian-security)}"
