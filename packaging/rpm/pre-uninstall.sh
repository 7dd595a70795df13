# Removal ($1 = 0, not an upgrade) stops and disables the service.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now shiftd.service >/dev/null 2>&1 || :
fi
