#!/usr/bin/env bash
# Make the virtualenv for the real-kohya tests (pytest -m kohya_e2e): sd-scripts' pinned requirements beside
# the CPU torch and this package. Kept apart from the test venv because sd-scripts pins older transformers,
# diffusers and accelerate than our own test extras.
#
#   scripts/kohya_env.sh [VENV_DIR] [SD_SCRIPTS_DIR]      (defaults: .venv-kohya, ../shared/sd-scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-kohya}"
SD="${2:-${SD_SCRIPTS_DIR:-../shared/sd-scripts}}"
if [ ! -f "$SD/train_network.py" ]; then
  echo "kohya_env.sh: no sd-scripts checkout at $SD (set SD_SCRIPTS_DIR or pass it)" >&2
  exit 2
fi
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --upgrade pip >/dev/null
pip install torch==2.13.0
# sd-scripts' own requirements, without its trailing `-e .` (its scripts import `library` from their folder);
# torchvision is imported by sd-scripts but not listed (kohya's install guide installs it with torch)
grep -v -E '^\s*-e\s' "$SD/requirements.txt" > "$VENV/sd-scripts-requirements.txt"
pip install -r "$VENV/sd-scripts-requirements.txt" torchvision "torch==2.13.0"
pip install lycoris-lora pytest
# DeepSpeed for the `train_network.py --deepspeed` test, without prebuilt ops as sd-scripts' deepspeed_utils.py says
# (the one release our own test venv uses; it works with sd-scripts' accelerate 1.6.0 and this torch). On a
# machine without CUDA it runs with DS_ACCELERATOR=cpu over gloo; its shared-memory comm op is compiled (ninja, g++)
# on first use into ~/.cache/torch_extensions, about a minute once
DS_BUILD_OPS=0 pip install deepspeed==0.19.8 "torch==2.13.0"
pip install --no-deps -e .
python - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision", "transformers", "diffusers", "accelerate", "deepspeed", "lycoris_lora", "sd_hina_plugin"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing")
PY
DS_ACCELERATOR=cpu python - <<'PY'
from deepspeed.accelerator import get_accelerator

accelerator = get_accelerator()
assert accelerator.device_name() == "cpu", accelerator.device_name()
print(f"deepspeed accelerator with DS_ACCELERATOR=cpu: {accelerator.device_name()} ({accelerator.communication_backend_name()})")
PY
