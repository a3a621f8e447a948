# Shared by scripts/run and scripts/test: Debian packages and the project's Python venv.
# shellcheck shell=bash

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
VENV="${VENV:-$PWD/.venv}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# install_packages PKG...: apt-get install those not installed yet.
install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# ensure_venv REQUIREMENTS_FILE: a venv in .venv with exactly those pins, reinstalled when they change.
ensure_venv() {
    local requirements="$1" stamp
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        install_packages python3-venv
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    stamp="$VENV/.installed-$(cat "$requirements" requirements.txt | sha256sum | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        echo "installing Python packages from $requirements into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" \
            >"$VENV/pip.log" 2>&1 || { cat "$VENV/pip.log" >&2; return 1; }
        touch "$stamp"
    fi
}
