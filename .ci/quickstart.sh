#!/usr/bin/env bash
# CI proves the README's *first* command too: a fresh virtualenv, the quickstart's install part verbatim (the base
# install a new user gets, no extras), then `lmuasr demo --quick`, `--help` of every verb, an import of every
# module, and the one-line refusal of a verb that needs an extra. A base dependency missing from pyproject.toml
# fails here, where the dev-extras test run (which installs matplotlib, DALI, ...) cannot see it.
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(awk '/<!-- quickstart-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}' README.md)
if [ -z "$line" ]; then
  echo "error: no quickstart command found after <!-- quickstart-command --> in README.md" >&2
  exit 1
fi
install=${line%%&& lmuasr demo*}
if [ "$install" = "$line" ]; then
  echo "error: the quickstart command does not end in '&& lmuasr demo ...': $line" >&2
  exit 1
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/lmuasr-quickstart.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
echo "+ (fresh venv) $install"
t0=$(date +%s)
eval "$install" > "$work/install.log" 2>&1 || { tail -30 "$work/install.log"; exit 1; }
echo "  installed in $(( $(date +%s) - t0 )) s"

echo "+ every module imports on the base install"
python3 - <<'EOF'
import importlib, pkgutil, lmu_asr
for m in pkgutil.walk_packages(lmu_asr.__path__, "lmu_asr."):
    importlib.import_module(m.name)
print("  ok:", sum(1 for _ in pkgutil.walk_packages(lmu_asr.__path__, "lmu_asr.")), "modules")
EOF

echo "+ --help of every verb"
verbs=$(python3 -c "
import click
from lmu_asr.cli import main
def walk(g, p):
    for n, c in g.commands.items():
        yield p + [n]
        if isinstance(c, click.Group):
            yield from walk(c, p + [n])
print('\n'.join(' '.join(v) for v in walk(main, [])))")
while read -r verb; do
  # shellcheck disable=SC2086
  lmuasr $verb --help > /dev/null || { echo "error: lmuasr $verb --help failed" >&2; exit 1; }
done <<< "$verbs"
echo "  ok: $(wc -l <<< "$verbs") verbs"

echo "+ a verb that needs an extra says so in one line and exits 2"
set +e
msg=$(lmuasr train --shards "$work/none" --out "$work/r" --loader dali 2>&1); code=$?
set -e
if [ "$code" != 2 ] || [ "$(wc -l <<< "$msg")" != 1 ] || ! grep -q "lmu-asr\[dali\]" <<< "$msg"; then
  echo "error: expected a one-line 'pip install lmu-asr[dali]' error with exit 2, got $code: $msg" >&2
  exit 1
fi
echo "  ok: $msg"

echo "+ lmuasr demo --quick (base install)"
t0=$(date +%s)
lmuasr demo --quick --out "$work/demo" --no-progress > "$work/demo.log" 2>&1 || { tail -40 "$work/demo.log"; exit 1; }
for f in report.md summary.json run/curves.png; do
  [ -s "$work/demo/$f" ] || { echo "error: demo --quick wrote no $f" >&2; tail -20 "$work/demo.log"; exit 1; }
done
tail -7 "$work/demo.log"
echo "  demo --quick took $(( $(date +%s) - t0 )) s"
