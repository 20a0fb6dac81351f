# The project's contract: `make demo` runs the main job, `make test` installs and runs the offline test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# torch is pinned and installed first so that pip never resolves a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
# Every other package installs at the exact version of the lock the suite was run with (`make lock` regenerates it).
LOCK := requirements/lock.txt
# Where `make lock` finds the CPU build of torch it resolves against (this machine's wheel folder; elsewhere e.g.
# TORCH_FIND_LINKS="--extra-index-url https://download.pytorch.org/whl/cpu").
TORCH_FIND_LINKS ?= --find-links /opt/wheels
UV_SPEC ?= uv==0.13.9
LATEST_VENV ?= .venv-latest
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

.PHONY: install test test-slow test-latest lock test-upstream quality style demo reproduce reproduce-rl reproduce-rl-1000 benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow and not gpu" -q tests

# Regenerate the lock from setup.py's ranges: the newest versions they allow today, resolved against torch's CPU build.
# Run `make test` on the result before committing it.
lock: | $(BIN)/python
	$(BIN)/pip install --quiet "$(UV_SPEC)"
	$(BIN)/uv pip compile setup.py --extra dev -c requirements/torch.txt $(TORCH_FIND_LINKS) --no-emit-package torch \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
		--upgrade -o $(LOCK)

# The suite against the newest versions setup.py allows (torch stays at TORCH_SPEC), in a venv of its own: drift is
# seen here before users see it. README, "Installs": what to do when it fails.
KEY_PACKAGES := ^(diffusers|transformers|accelerate|peft|datasets|huggingface.hub|bitsandbytes|safetensors|kernels)==
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-pin.txt -e ".[dev]"
	@echo "test-latest resolved:"; $(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -iE "$(KEY_PACKAGES)"
	@echo "the lock has:"; grep -iE "$(KEY_PACKAGES)" $(LOCK)
	$(TEST_ENV) $(LATEST_VENV)/bin/python -m pytest -m "not slow and not gpu" -q tests

test-slow: install
	$(TEST_ENV) $(BIN)/python -m pytest -m "slow" -q tests

# diffusers' own SchedulerCommonTest and PipelineTesterMixin against DMDRScheduler / FewStepDMDRPipeline. They are
# not in diffusers' wheel or sdist: give a checkout of diffusers' repository, e.g. DIFFUSERS_SRC=../diffusers.
test-upstream: install
	@test -n "$(DIFFUSERS_SRC)" || { echo "Set DIFFUSERS_SRC to a checkout of github.com/huggingface/diffusers"; exit 2; }
	$(BIN)/pip install --quiet parameterized requests-mock
	DIFFUSERS_SRC=$(abspath $(DIFFUSERS_SRC)) HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 \
		$(BIN)/python -m pytest -o addopts=-ra -q tests/test_diffusers_mixins.py

quality: install
	$(BIN)/ruff check src pipelines examples tests benchmarks
	$(BIN)/ruff format --check src pipelines examples tests benchmarks

style: install
	$(BIN)/ruff check --fix src pipelines examples tests
	$(BIN)/ruff format src pipelines examples tests

# One torch thread per process (here and in the training subprocess): on the shared 2-core machine two threads ran
# 10-20x slower (docs/reproduction.md).
demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
		$(BIN)/python -m diffusers_dmdr.demo --output_dir outputs/demo --num_threads 1

# One torch thread: on the shared 2-core machine two threads ran 20x slower (docs/reproduction.md).
reproduce: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
		$(BIN)/python -m diffusers_dmdr.digits.reproduce --output_dir outputs/reproduce --docs docs/reproduction.md \
		--num_threads 1
	@if [ "$(RL)" = 1 ]; then $(MAKE) reproduce-rl; else echo "(make reproduce RL=1, or make reproduce-rl, adds issue 22's ReFL / GRPO / DPO table: 1.5-3 hours)"; fi

# Optional, long part of the reproduction (issue 22, docs/rl.md): ReFL, GRPO (with DMD, Flow-GRPO's KL or nothing) and
# DPO against DMD only, each the full demo recipe, three training seeds, two runs at once (5-10 min per run on a free
# core: 1.5-3 hours). Finished runs in outputs/rl_comparison are reused; the ranked table goes to docs/rl_runs/.
reproduce-rl: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
		$(BIN)/python -m diffusers_dmdr.digits.rl_comparison --output_dir outputs/rl_comparison \
		--docs docs/rl_runs/table.md --archive docs/rl_runs --jobs 2

# The 1000-step comparison of docs/rl.md (lambda 10 and KL weight 0.4 for the GRPO arms; ReFL and DPO as the recipe),
# then every student evaluated again on 1280 samples (the teacher once, same noise): about 3 hours with two runs at
# once. Finished runs in outputs/rl_1000 are reused; the tables and records go to docs/rl_runs_1000/.
RL_1000 = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
	$(BIN)/python -m diffusers_dmdr.digits.rl_comparison --output_dir outputs/rl_1000 --max_train_steps 1000
RL_1000_ARMS = dmd_only refl grpo_dmd grpo_kl grpo_none dpo_dmd grpo_dmd_all
reproduce-rl-1000: install
	$(RL_1000) --jobs 2 --arms dmd_only grpo_dmd grpo_kl grpo_none --train_args "--rl_weight 10 --rl_kl_weight 0.4"
	$(RL_1000) --jobs 2 --arms refl dpo_dmd
	$(RL_1000) --jobs 2 --arms grpo_dmd_all --train_args "--rl_weight 10"
	$(RL_1000) --skip_training --arms $(RL_1000_ARMS) --evaluation_num_per_pair 64 \
		--archive docs/rl_runs_1000 --docs docs/rl_runs_1000/table_n64.md
	$(RL_1000) --collect_only --arms $(RL_1000_ARMS) --docs docs/rl_runs_1000/table.md

# Training-memory benchmark (docs/benchmarks.md): the reduced CPU figures, or on a GPU
# `$(BIN)/python benchmarks/train_memory.py --model sdxl --device cuda`; then the real-size fake-tensor estimate of a
# whole iteration per recipe (iteration_memory.py: about an hour on one core).
benchmark: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/train_memory.py --model sdxl-cpu
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/train_memory.py --plan
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/iteration_memory.py --calibration
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/iteration_memory.py

clean:
	rm -rf outputs build dist src/*.egg-info .pytest_cache $(LATEST_VENV)
