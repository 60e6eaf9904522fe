#!/bin/sh
# Jupyter Lab of the workspace container, behind the password from .env (JUPYTER_PASSWORD).
# The password is hashed here (argon2, jupyter_server.auth.passwd) so the clear text never
# appears on a command line; with a hashed password Jupyter Server 2 asks for no token.
set -eu
: "${JUPYTER_PASSWORD:?set JUPYTER_PASSWORD in .env}"
hashed=$(python -c 'import os; from jupyter_server.auth import passwd; print(passwd(os.environ["JUPYTER_PASSWORD"]))')
exec jupyter lab \
  --ServerApp.ip=0.0.0.0 \
  --ServerApp.port=8888 \
  --ServerApp.root_dir=/workspace \
  --ServerApp.open_browser=False \
  --ServerApp.allow_root=True \
  --PasswordIdentityProvider.hashed_password="$hashed" \
  --PasswordIdentityProvider.password_required=True
