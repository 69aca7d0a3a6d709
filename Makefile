# The README's two commands. Both create .venv and install what they need (torch pinned first).
PY := .venv/bin/python
DEMO_DIR ?= runs/demo
# Bundled default: tiny model + bundled HH data, SFT then DPO seeded from the SFT result.
DEMO_ARGS ?= n_examples=1024 eval_every=512 n_eval_examples=128 max_length=256 max_prompt_length=128 \
             warmup_steps=20 batch_size=8 eval_batch_size=16 n_eval_model_samples=16

.PHONY: demo test install install-test clean

install:
	bash scripts/setup_venv.sh

install-test:
	bash scripts/setup_venv.sh test

demo: install
	bash scripts/demo.sh $(DEMO_DIR) $(DEMO_ARGS)

test: install-test
	$(PY) -m pytest -q tests

clean:
	rm -rf .venv runs build src/*.egg-info
