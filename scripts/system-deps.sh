#!/bin/sh
# System packages the tests exercise: bubblewrap (sandbox isolation), Node.js and npm (JavaScript stubs), chromium
# (the web console, driven headless over the DevTools protocol), prosody and mosquitto (the back-ends of the
# interworking stubs stubs/xmpp and stubs/mqtt, started by their tests and the demo), nats-server (the message
# node cluster), openssl (a test certificate for the Node host's TLS-over-brokered-socket test). Installed when missing and we may (root + apt);
# otherwise say so loudly: the tests that need them then skip with that reason, never silently.
set -u
missing=""
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
command -v node >/dev/null 2>&1 || command -v nodejs >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$missing chromium"
command -v prosody >/dev/null 2>&1 || missing="$missing prosody"
command -v mosquitto >/dev/null 2>&1 || missing="$missing mosquitto"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing="$missing nats-server"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages:$missing"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null && exit 0
    echo "WARNING: could not install$missing; the tests that need them will be skipped" >&2
else
    echo "WARNING: missing system packages:$missing (install them as root); the tests that need them will be skipped" >&2
fi
exit 0
