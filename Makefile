# The README's two commands. Both create .venv and install what they need (torch pinned first,
# every other package at the version in constraints.txt).
PY := .venv/bin/python
DEMO_DIR ?= runs/demo
# Bundled default: tiny model + bundled HH data, SFT then DPO seeded from the SFT result.
DEMO_ARGS ?= n_examples=1024 eval_every=512 n_eval_examples=128 max_length=256 max_prompt_length=128 \
             warmup_steps=20 batch_size=8 eval_batch_size=16 n_eval_model_samples=16
CODE := src tests benchmarks scripts

.PHONY: demo test lint lock bench install install-dev clean

install:
	bash scripts/setup_venv.sh

install-dev:
	bash scripts/setup_venv.sh test,lint

demo: install
	bash scripts/demo.sh $(DEMO_DIR) $(DEMO_ARGS)

test: install-dev
	bash scripts/setup_fuse.sh
	$(PY) -m pytest -q tests

lint: install-dev
	.venv/bin/ruff check $(CODE)
	.venv/bin/ruff format --check $(CODE)
	.venv/bin/mypy

# Re-resolve every dependency in a fresh virtualenv and rewrite constraints.txt.
lock:
	bash scripts/lock.sh

# Benchmarks: tables on stdout, JSON in runs/bench/ (peers.py creates .venv-peers with TRL on first use;
# reference.py, run when DPO_REFERENCE_DIR names a checkout of the reference, creates .venv-reference).
bench: install-dev
	mkdir -p runs/bench
	$(PY) benchmarks/train_throughput.py --json runs/bench/train_throughput.json
	$(PY) benchmarks/checkpoint_io.py --json runs/bench/checkpoint_io.json
	$(PY) benchmarks/peers.py --json runs/bench/peers.json
	$(PY) benchmarks/peers_losses.py --json runs/bench/peers_losses.json
	$(PY) benchmarks/learning_losses.py --json runs/bench/learning_losses.json
	$(PY) benchmarks/lora.py --json runs/bench/lora.json
	$(PY) benchmarks/compile.py --json runs/bench/compile.json
	$(PY) benchmarks/distributed.py --json runs/bench/distributed.json
	@if [ -n "$$DPO_REFERENCE_DIR" ]; then $(PY) benchmarks/reference.py --json runs/bench/reference.json; \
	else echo "benchmarks/reference.py skipped: set DPO_REFERENCE_DIR to a checkout of the DPO reference repository"; fi

clean:
	rm -rf .venv .venv-peers .venv-reference runs build src/*.egg-info
