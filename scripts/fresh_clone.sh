#!/usr/bin/env bash
# The check to run before resolving an issue: clone the committed tree to a temporary folder, make a new
# virtual environment there, run the README's two opening commands exactly as written, and report times.
#   bash scripts/fresh_clone.sh            # both commands (quickstart ~3 min, tests ~5 min on 2 cores)
#   bash scripts/fresh_clone.sh --tests    # the test command only
# Exit status is non-zero if either command fails. Logs stay in the printed folder.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
only_tests=0; [[ "${1:-}" == "--tests" ]] && only_tests=1
work="$(mktemp -d "${TMPDIR:-/tmp}/polyalign-fresh.XXXXXX")"
git clone -q "$repo" "$work/polyalign"
cd "$work/polyalign"
# The README's first bash block opens with the two commands, one per line.
mapfile -t cmds < <(awk '/^```bash/{f=1; next} f && /^```/{exit} f' README.md | head -2)
[[ ${#cmds[@]} -eq 2 ]] || { echo "fresh_clone: README.md does not open with two commands" >&2; exit 2; }
python3 -m venv "$work/venv"
status=0
for i in 0 1; do
  [[ $only_tests -eq 1 && $i -eq 0 ]] && continue
  log="$work/command$((i + 1)).log"
  echo "fresh_clone: running: ${cmds[$i]}"
  start=$SECONDS
  if (source "$work/venv/bin/activate" && bash -c "${cmds[$i]}") >"$log" 2>&1; then result=ok; else result=FAILED; status=1; fi
  echo "fresh_clone: $result in $((SECONDS - start)) s (log: $log)"
  tail -n 3 "$log" | sed 's/^/    /'
done
echo "fresh_clone: load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, commit $(git rev-parse --short HEAD)"
exit $status
