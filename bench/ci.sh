#!/usr/bin/env bash
# The quick benchmark for CI: relay and Postfix under the same load, one table of ratios.
# Never fails the build (performance is reported, not gated; the machine is shared and
# noisy). A run that LOST or DUPLICATED a message says so loudly in the output.
cd "$(dirname "$0")/.." || exit 0
# The test command passes its virtualenv's interpreter; by hand, the project's .venv.
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/postfix ]; then
    timeout 300 "$PY" bench/run.py --quick "$@"
else
    echo "bench: Postfix needs root and /usr/sbin/postfix; running relay alone" >&2
    timeout 300 "$PY" bench/run.py --quick --only relay "$@"
fi
rc=$?
case $rc in
    0) ;;
    3) echo "bench: !!! MESSAGES LOST OR DUPLICATED (see above) !!!" >&2 ;;
    *) echo "bench: did not complete (exit $rc); not failing the build" >&2 ;;
esac
# Claim time and memory against queue depth (10k, 100k, 1M recipients; ~40 s).
timeout 300 "$PY" bench/queue_depth.py || echo "bench: queue_depth did not complete" >&2
exit 0
