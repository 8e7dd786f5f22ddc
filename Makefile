# make setup: .venv/ with the project (editable), its development extras and CI's CPU-friendly pins.
# make test:  set up when needed, then lint and run the whole test suite (what CI runs).
# make test-fast: the unit tests only (tests/unit: one process, no services), in under 2 minutes.
# make demo:  set up, write the embedded demo shards, train the tiny MI-MAE and, the same way, the MAE
#             control with the same 4 masks (no MI terms: the same views and nearly the same compute,
#             docs/METHOD.md) for 10 epochs each on 2 CPU ranks with the deepspeed launcher
#             (ZeRO 1, DALI CPU pipeline), print a summary, score both and a random initialisation with
#             kNN and linear probes on the held-out split, draw the reconstructions. DEMO_ARGS adds
#             key.sub=value settings to both runs (CI: DEMO_ARGS=train.max_steps=6).
# make demo-finetune: after make demo, fine-tune and linearly probe its encoder through the same engine
#             and print held-out top-1 (docs/FINETUNE.md); FT_ARGS adds settings (CI: FT_ARGS=train.max_steps=6).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's ops are JIT-built when first used; never at install time.
export DS_BUILD_OPS := 0
# The interpreter runs Triton kernels on the CPU (tests only; a GPU run leaves it unset).
# DeepSpeed JIT-compiles a CPU communication op on first use (~40 s): keep it across runs.
EXT_DIR := $(HOME)/.cache/mimae_scale/torch_extensions
TEST_ENV := TRITON_INTERPRET=1 TORCH_EXTENSIONS_DIR=$(EXT_DIR)
# A build killed half-way leaves torch's `lock` file behind and every later build then waits on it
# forever; nothing builds before a target starts, so any lock found then is stale.
CLEAR_STALE_LOCKS := find $(EXT_DIR) -name lock -delete 2>/dev/null || true

.PHONY: setup test test-fast lint clean demo demo-finetune device-bundle

DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
# one thread per rank: 2 ranks on 2 cores
DEMO_ENV := OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR=$(EXT_DIR)

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-ci.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-ci.txt -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(CLEAR_STALE_LOCKS)
	$(TEST_ENV) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(CLEAR_STALE_LOCKS)
	$(TEST_ENV) $(BIN)/python -m pytest -q tests/unit

# base_lr 6e-3 (4x the tiny config's): at 3 epochs / 1.5e-3 the encoder did not yet beat a random
# initialisation on the probes (docs/RESULTS.md)
DEMO_TRAIN = --config tiny engine.zero_stage=1 train.epochs=10 optim.base_lr=6e-3 eval.knn_every_epochs=5 \
	data.backend=dali data.train_shards=$(DEMO_DIR)/shards/train data.val_shards=$(DEMO_DIR)/shards/val
DEMO_LAUNCH = $(DEMO_ENV) $(BIN)/deepspeed --num_gpus 2 mimae_scale/train.py $(DEMO_TRAIN)

demo: $(STAMP)
	test -f $(DEMO_DIR)/shards/train/manifest.json || $(BIN)/mimae-shards demo $(DEMO_DIR)/shards
	rm -rf $(DEMO_DIR)/run $(DEMO_DIR)/mae4_run
	$(CLEAR_STALE_LOCKS)
	$(DEMO_LAUNCH) run_dir=$(DEMO_DIR)/run $(DEMO_ARGS)
	$(DEMO_LAUNCH) run_dir=$(DEMO_DIR)/mae4_run loss.w_max=0 loss.w_min=0 $(DEMO_ARGS)
	$(BIN)/python -m mimae_scale.engine.summary $(DEMO_DIR)/run
	$(DEMO_ENV) $(BIN)/mimae-eval compare --model mimae=$(DEMO_DIR)/run --model mae4=$(DEMO_DIR)/mae4_run \
		--random-init --train $(DEMO_DIR)/shards/train --val $(DEMO_DIR)/shards/val --device cpu \
		--out $(DEMO_DIR)/eval.json
	$(DEMO_ENV) $(BIN)/mimae-viz $(DEMO_DIR)/run $(DEMO_DIR)/shards/val $(DEMO_DIR)/recon.png

# After `make demo`: fine-tune, then linearly probe, the demo's pretrained MI-MAE (runs/demo/run) on its labelled
# shards through the same engine (2 CPU ranks, DALI), MAE's recipes at the tiny size (docs/FINETUNE.md); each
# logs its held-out top-1, and the run summaries end it. FT_ARGS adds key.sub=value settings to both (CI: FT_ARGS=train.max_steps=6).
FT_ARGS ?=
FT_DATA = data.backend=dali data.train_shards=$(DEMO_DIR)/shards/train data.val_shards=$(DEMO_DIR)/shards/val \
	finetune.init=$(DEMO_DIR)/run

demo-finetune: $(STAMP)
	@test -f $(DEMO_DIR)/run/checkpoints/latest || { echo "no pretrained demo run in $(DEMO_DIR)/run: make demo first" >&2; exit 2; }
	rm -rf $(DEMO_DIR)/finetune_run $(DEMO_DIR)/linprobe_run
	$(CLEAR_STALE_LOCKS)
	$(DEMO_ENV) $(BIN)/deepspeed --num_gpus 2 mimae_scale/train.py --config finetune_tiny $(FT_DATA) \
		run_dir=$(DEMO_DIR)/finetune_run $(FT_ARGS)
	$(DEMO_ENV) $(BIN)/deepspeed --num_gpus 2 mimae_scale/train.py --config linprobe_tiny $(FT_DATA) \
		run_dir=$(DEMO_DIR)/linprobe_run $(FT_ARGS)
	$(BIN)/python -m mimae_scale.engine.summary $(DEMO_DIR)/finetune_run
	$(BIN)/python -m mimae_scale.engine.summary $(DEMO_DIR)/linprobe_run

# The offline bundle for a fresh GPU machine (docs/GPU.md): BUNDLE_PYTHON=3.11 for a rehearsal here.
device-bundle:
	bash device/bundle.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache
