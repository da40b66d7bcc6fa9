# Sourced by scripts/*_env.sh: a cached virtual environment, rebuilt only when what it should hold changed.
#   venv_begin VENV STAMP WANT LABEL  takes VENV.lock (fd 9, held until the script exits: one builder at a
#                                     time, as several checkouts or CI jobs may share a venv path); exits 0
#                                     when STAMP holds WANT, else makes VENV anew (empty)
#   venv_done                         records WANT in STAMP and says how long the build took
venv_begin() {
  _venv=$1 _stamp=$2 _want=$3 _label=$4
  mkdir -p "$(dirname "$_venv")"
  exec 9>"$_venv.lock"
  flock 9
  if [ -f "$_stamp" ] && [ "$(cat "$_stamp")" = "$_want" ] && [ -x "$_venv/bin/python" ]; then
    echo "$_label $_venv: cached"
    exit 0
  fi
  _start=$(date +%s)
  rm -rf "$_venv"
  "$python" -m venv "$_venv"
}

venv_done() {
  echo "$_want" >"$_stamp"
  echo "$_label $_venv: built in $(($(date +%s) - _start)) s"
}
