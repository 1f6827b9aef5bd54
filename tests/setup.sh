#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine: blip2 with its test extras, and the system
# programs that some tests drive for real. README's test command and .ci/run run this first.
set -euo pipefail
cd "$(dirname "$0")/.."

# need PROGRAM PACKAGE...: install the Debian packages unless PROGRAM is already on the PATH.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    shift
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ -z "${apt_updated:-}" ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

need java default-jre-headless  # pycocoevalcap (blip2 eval caption): PTB tokenizer and METEOR
need gcc gcc libc6-dev # blip2.native compiles its linear kernel (tests/test_native.py, test_batch_invariance.py)
pip install torch==2.13.0 -e ".[dev]"
need chromium chromium  # tests/test_web.py drives the web page in headless Chromium (through Playwright)
