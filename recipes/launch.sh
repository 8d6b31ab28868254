# shellcheck shell=bash
# The recipes' one way into Python: `launch recipe DATASET LOSS "$@"` or `launch compare DATASET "$@"` runs
# python -m isreshape_verl.launch (every knob, its checks, the command and the run: isreshape_verl/launch/)
# with PYTHON (python3 unless set), this checkout first on its path.
launch() {
    local python=${PYTHON:-python3} repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: PYTHON='$python' is not an executable; set PYTHON to the Python that has this package (pip install -e .)" >&2
        exit 2
    fi
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m isreshape_verl.launch "$@"
}
