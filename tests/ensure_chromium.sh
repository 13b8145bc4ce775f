#!/bin/sh
# The web-page tests drive Debian's Chromium at /usr/bin/chromium. `make test` calls this
# before pytest: install it when it is missing and we can (root, with apt-get); otherwise
# stop here with the command to run, rather than fail two tests at setup.
set -eu
CHROMIUM=/usr/bin/chromium
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's chromium for the web-page tests (apt-get, about a minute)..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    [ -x "$CHROMIUM" ] && exit 0
    echo "apt-get installed chromium but $CHROMIUM is missing; see 'dpkg -L chromium'." >&2
    exit 1
fi
if command -v apt-get >/dev/null 2>&1; then
    how="sudo apt-get install chromium"
else
    how="install Chromium so that $CHROMIUM runs it"
fi
echo "The web-page tests need Chromium at $CHROMIUM: run \`$how\`, then \`make test\` again." >&2
exit 1
