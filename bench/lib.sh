# shellcheck shell=bash
# Shared by the bench/ scripts (sourced): wall-clock helpers.

now() { date +%s.%N; }

# The best wall time, in seconds, of `$runs` runs of "$@" (output discarded).
best() {
  local best=
  for _ in $(seq "${runs:?set runs before calling best}"); do
    local t0 t1
    t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
    best=$(python3 -c "t=$t1-$t0; b='$best'; print(min(t, float(b)) if b else t)")
  done
  printf '%.3f' "$best"
}
