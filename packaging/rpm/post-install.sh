# Installed but not enabled or started: it cannot run before the role ARNs are filled in.
# On upgrade ($1 > 1), a running shiftd picks up the new binary.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -gt 1 ]; then
        systemctl try-restart shiftd.service >/dev/null 2>&1 || :
    fi
fi
