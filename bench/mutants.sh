#!/usr/bin/env bash
# Shows that tests can fail: each bench/mutants/NAME.patch puts one known mistake into a copy of this
# tree (its header names the test that must catch it and whether that test needs a GPU); the named
# test runs on the copy and must FAIL. Prints one line per mutant; exits 1 if any mutant survived.
#   bash bench/mutants.sh [cpu|gpu|all] [NAME ...]     (default: the mutants this machine can run)
set -uo pipefail
cd "$(dirname "$0")/.."
want="${1:-auto}"; shift || true
[ "$want" = auto ] && want=$(python3 -c 'import torch; print("all" if torch.cuda.is_available() else "cpu")')
names=("$@"); [ ${#names[@]} -eq 0 ] && names=($(ls bench/mutants/*.patch | xargs -n1 basename | sed 's/\.patch$//'))
survived=0; copy=$(mktemp -d)
for name in "${names[@]}"; do
  patch="bench/mutants/$name.patch"
  test=$(sed -n 's/^# test: //p' "$patch"); mark=$(sed -n 's/^# mark: //p' "$patch")
  [ "$want" != all ] && [ "$mark" != "$want" ] && continue
  rm -rf "$copy/tree" && mkdir -p "$copy/tree"
  tar --exclude=./.git --exclude=./.whl --exclude=./.base --exclude='*/__pycache__' -cf - . | tar -xf - -C "$copy/tree"
  if ! (cd "$copy/tree" && git apply "$OLDPWD/$patch" 2>/dev/null || patch -s -p1 < "$OLDPWD/$patch"); then
    echo "$name: the patch no longer applies (update it)"; survived=1; continue
  fi
  began=$SECONDS
  (cd "$copy/tree" && PYTHONPATH="$copy/tree:${PYTHONPATH:-}" timeout "${MUTANT_TIMEOUT:-600}" \
     python3 -m pytest -q -x -p no:cacheprovider -m "${mark/cpu/not gpu}" "$test") > "$copy/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 1 ] || [ $rc -eq 124 ]; then
    echo "$name: caught by $test (rc $rc, $((SECONDS - began)) s): $(grep -m1 -E '^E ' "$copy/$name.log" | cut -c1-150)"
  else
    echo "$name: SURVIVED $test (rc $rc)"; tail -5 "$copy/$name.log"; survived=1
  fi
  [ -n "${OUT:-}" ] && cp "$copy/$name.log" "$OUT/mutant_$name.log"
done
rm -rf "$copy"; exit $survived
