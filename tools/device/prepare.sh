#!/usr/bin/env bash
# Build the folder the GPU check carries to a lent GPU machine (docs/GPU.md): that machine has
# no package index and no ../shared, so everything `mmfold bench-gpu --carry` reads travels:
#   wheels/    py3.12 manylinux x86_64 wheels of the pinned requirements it lacks and the check
#              imports (`mmfold bench-gpu --requirements`, one version each), and mmfold itself
#   data/      fashion (PHOTOS photos, a seeded sample of its 12,000 rows) and comp5329 (all)
#   weights/   Lite0's backbone and MiniLM, matrices in fp16, MiniLM's word embeddings cut to
#              the ids the carried captions use (unpacked to fp32 on the device, once)
# and checks that one call stays under the 64 MiB it may carry (the working tree that travels,
# tracked and untracked-but-not-ignored files, plus this folder).
#
# Usage: tools/device/prepare.sh            (writes .device/, which git ignores)
#   PHOTOS=5000 DEVICE_DIR=/tmp/carry SHARED=../shared/data PY=.venv/bin/python tools/device/prepare.sh
#   EXTRA_WHEELS="timm==1.0.31"   also carry these pins (a package the machine has in a version that fails)
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
DEVICE_DIR=${DEVICE_DIR:-.device}
SHARED=${SHARED:-../shared/data}
PHOTOS=${PHOTOS:-5000}
EXTRA_WHEELS=${EXTRA_WHEELS:-}
LIMIT=$((64 * 1024 * 1024))
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEVICE_DIR"
mkdir -p "$DEVICE_DIR/wheels"

echo "== wheels the GPU machine lacks (pinned in requirements.txt)"
"$PY" -m mmfold bench-gpu --requirements > "$DEVICE_DIR/requirements.txt"
for pin in $EXTRA_WHEELS; do echo "$pin" >> "$DEVICE_DIR/requirements.txt"; done
cat "$DEVICE_DIR/requirements.txt"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEVICE_DIR/wheels" -r "$DEVICE_DIR/requirements.txt"

echo "== mmfold as a wheel (this working tree)"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar --exclude=__pycache__ -cf - pyproject.toml README.md src | tar -xf - -C "$src"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$DEVICE_DIR/wheels" "$src"

names=$(for w in "$DEVICE_DIR"/wheels/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--'; done | sort)
if [ -n "$(uniq -d <<<"$names")" ]; then
    echo "prepare.sh: two versions of $(uniq -d <<<"$names" | tr '\n' ' ')in $DEVICE_DIR/wheels: one each, or the install stops" >&2
    exit 1
fi

echo "== data and weights ($PHOTOS fashion photos)"
"$PY" -m mmfold bench-gpu --pack "$DEVICE_DIR" --shared "$SHARED" --photos "$PHOTOS" > "$DEVICE_DIR/pack.log"
cat "$DEVICE_DIR/MANIFEST.json"

tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carry=$(du -sb "$DEVICE_DIR" | cut -f1)
total=$((tree + carry))
awk -v t="$total" -v w="$tree" -v c="$carry" -v d="$DEVICE_DIR" -v l="$LIMIT" 'BEGIN {
    printf "== one call carries %.1f MiB (working tree %.1f MiB + %s %.1f MiB) of the %d MiB a call may carry\n",
           t / 1048576, w / 1048576, d, c / 1048576, l / 1048576 }'
if [ "$total" -ge "$LIMIT" ]; then
    echo "prepare.sh: too big for one call: run it again with fewer photos (PHOTOS=$((PHOTOS * 3 / 4)))" >&2
    exit 1
fi
