#!/usr/bin/env bash
# Create (idempotently) the users and group of the access-control tests:
#
#   group deb-bus        may connect to a 0660 socket of group deb-bus
#   user  deb-collector  member of deb-bus (acts as procmond)
#   user  deb-agent      member of deb-bus (acts as daemoneye-agent)
#   user  deb-stranger   not a member: cannot connect at all
#
# All have primary group nogroup, no home directory and a nologin shell.
# Needs root; exits 0 when everything already exists.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "users.sh: must run as root" >&2
  exit 1
fi

GROUP=deb-bus
MEMBERS=(deb-collector deb-agent)
OUTSIDERS=(deb-stranger)
PRIMARY=nogroup
SHELL_=/usr/sbin/nologin
[ -x "$SHELL_" ] || SHELL_=/bin/false

if ! getent group "$PRIMARY" >/dev/null; then
  groupadd --system "$PRIMARY"
  echo "users.sh: created group $PRIMARY"
fi

if getent group "$GROUP" >/dev/null; then
  echo "users.sh: group $GROUP exists"
else
  groupadd "$GROUP"
  echo "users.sh: created group $GROUP"
fi

ensure_user() {
  local user=$1
  if getent passwd "$user" >/dev/null; then
    echo "users.sh: user $user exists"
  else
    useradd -M -N -s "$SHELL_" -g "$PRIMARY" "$user"
    echo "users.sh: created user $user"
  fi
}

for user in "${MEMBERS[@]}"; do
  ensure_user "$user"
  if id -nG "$user" | tr ' ' '\n' | grep -qx "$GROUP"; then
    echo "users.sh: $user is in $GROUP"
  else
    usermod -aG "$GROUP" "$user"
    echo "users.sh: added $user to $GROUP"
  fi
done

for user in "${OUTSIDERS[@]}"; do
  ensure_user "$user"
  if id -nG "$user" | tr ' ' '\n' | grep -qx "$GROUP"; then
    gpasswd -d "$user" "$GROUP" >/dev/null
    echo "users.sh: removed $user from $GROUP"
  fi
done
