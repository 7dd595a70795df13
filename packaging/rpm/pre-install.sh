# The service user, before the files that belong to its group are installed.
if ! getent passwd shiftd >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
        echo 'u shiftd - "shiftd EC2 scheduler" /var/lib/shiftd -' | systemd-sysusers -
    else
        useradd --system --user-group --no-create-home --home-dir /var/lib/shiftd --shell /sbin/nologin shiftd
    fi
fi
