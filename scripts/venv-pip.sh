# Sourced by the setup scripts: `venv_pip VENV ARGS...` runs `pip install` inside VENV, quietly,
# without the machine's pip-config noise about index folders that lack a package.
venv_pip() {
    local venv=$1 rc
    shift
    set +e
    "$venv/bin/python" -m pip install --quiet --progress-bar off "$@" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory"
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}
