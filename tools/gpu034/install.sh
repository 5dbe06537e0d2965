#!/usr/bin/env bash
# On the GPU host, from the repo root, in EVERY call of the sequence in tools/gpu034/README.md (one piece .gpu034_K
# carried per call; pieces of earlier calls stay on the warm machine):   bash tools/gpu034/install.sh
# Each call checks the pieces present, copies them aside and (first call) starts a background unpacker (setsid, so
# it outlives the call) that inflates the pieces in order into $GPU034_DEST (default /tmp/site034) as they come.
# The call that brings the last piece waits for the unpacker, links the host's CUDA 13 libraries, writes
# $GPU034_DEST/env.sh and checks torch + vLLM. Nothing is installed from a network; nothing outside /tmp is written.
# After it:  source /tmp/site034/env.sh   (PYTHONPATH=/tmp/site034 first: torch 2.14 shadows the host's 2.11)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${GPU034_DEST:-/tmp/site034}
ST=/tmp/gpu034-state
cd "$ROOT"
shopt -s nullglob
sums=(.gpu034_*/SHA256SUMS)
[ ${#sums[@]} -gt 0 ] || { echo "gpu034: no piece here: carry .gpu034_1 (then _2, ...) with this call" >&2; exit 1; }
N=$(wc -l < "${sums[0]}")
mkdir -p "$ST/parts"
# A state from another build (other checksums) is dropped.
if ! cmp -s "${sums[0]}" "$ST/SHA256SUMS"; then
  [ -e "$ST/unpacker.pid" ] && kill "$(cat "$ST/unpacker.pid")" 2>/dev/null || true
  rm -rf "$ST" "$DEST" "$DEST.partial" && mkdir -p "$ST/parts" && cp "${sums[0]}" "$ST/SHA256SUMS"
fi

# 1. Pieces that arrived (a call's command runs after its carry is complete): check, copy aside, mark ready.
k=0
while read -r sum file; do
  k=$((k + 1))
  [ -e "$ST/ready.$k" ] && continue
  src=.gpu034_$k/$file
  [ -f "$src" ] || continue
  echo "$sum  $src" | sha256sum -c --quiet - || { echo "gpu034: piece $k is damaged; carry .gpu034_$k again" >&2; exit 1; }
  cp "$src" "$ST/parts/$file.tmp" && mv "$ST/parts/$file.tmp" "$ST/parts/$file" && touch "$ST/ready.$k"
done < "$ST/SHA256SUMS"
have=$(ls "$ST"/ready.* 2>/dev/null | wc -l)

# 2. The unpacker: reads the pieces in order as they become ready (30 min at most), inflates, untars.
if [ ! -e "$ST/unpacker.pid" ]; then
  setsid bash -c '
    set -o pipefail
    ST=$1; DEST=$2; N=$3
    rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
    for k in $(seq 1 "$N"); do
      t=0
      while [ ! -e "$ST/ready.$k" ]; do sleep 0.5; t=$((t + 1)); [ $t -lt 3600 ] || exit 9; done
      cat "$ST/parts/$(sed -n "${k}p" "$ST/SHA256SUMS" | awk "{print \$2}")"
    done | xz -dc -T0 | tar -x -C "$DEST.partial" --strip-components=1
    rc=$?
    [ $rc -eq 0 ] && rm -rf "$DEST" && mv "$DEST.partial" "$DEST" && rm -f "$ST"/parts/*
    echo $rc > "$ST/unpacked"
  ' gpu034-unpack "$ST" "$DEST" "$N" > "$ST/unpack.log" 2>&1 < /dev/null &
  echo $! > "$ST/unpacker.pid"
fi
if [ "$have" -lt "$N" ]; then
  missing=$(for k in $(seq 1 "$N"); do [ -e "$ST/ready.$k" ] || printf ' %s' "$k"; done)
  echo "gpu034: $have of $N pieces in, unpacking in the background; still to carry:$missing"
  exit 0
fi

# 3. Last piece in: wait for the unpacker (5 min at most).
t=0
while [ ! -e "$ST/unpacked" ]; do sleep 0.5; t=$((t + 1)); [ $t -lt 600 ] || { cat "$ST/unpack.log"; exit 1; }; done
[ "$(cat "$ST/unpacked")" = 0 ] || { echo "gpu034: unpacking failed:"; cat "$ST/unpack.log"; exit 1; }

# 4. The host's CUDA 13 libraries (those of its torch 2.11, in site-packages/nvidia/*) are linked into
# $DEST/nvidia, where torch 2.14's RPATH ($ORIGIN/../../nvidia/...) and its preloader look first; NCCL comes
# from the bundle (2.30.7: torch 2.14 needs functions the 2.28 of torch 2.11 lacks).
HOST_NV=$(env -u PYTHONPATH python3 -c 'import nvidia, os
p = [d for d in nvidia.__path__ if os.path.isdir(os.path.join(d, "cu13"))] or list(nvidia.__path__)
print(p[0])')
for d in "$HOST_NV"/*/; do
  d=${d%/}; n=$(basename "$d")
  [ -e "$DEST/nvidia/$n" ] || ln -s "$d" "$DEST/nvidia/$n"
done
cat > "$DEST/env.sh" <<EOF
# torch 2.14.0 + vLLM 0.34.0 from $DEST ahead of the host's torch 2.11 (tools/gpu034/README.md)
export PYTHONPATH=$DEST\${PYTHONPATH:+:\$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1
EOF
# shellcheck disable=SC1091
source "$DEST/env.sh"
python3 -c "import torch, vllm; print(torch.__version__, vllm.__version__, torch.cuda.is_available())"
python3 "$ROOT/tools/gpu034/check.py" "$DEST" "$(dirname "$HOST_NV")"
echo "gpu034: ready. In later commands: source $DEST/env.sh"
