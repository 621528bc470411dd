# The README's commands. Each sets up what it needs in .venv (Python 3.11+).
#   make demo   clean -> tokenizer -> prepare -> train configs/tiny.toml -> sample, on data/sample (CPU, a few minutes)
#   make test   the test suite (CPU-only, ~15 minutes on 2 cores, plus the first install)
# TORCH picks the PyTorch build: the default resolves to the CUDA build on Linux from PyPI;
# for a CPU-only wheel use e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO := out/demo

.PHONY: setup demo test test-all lint bench-cpu corpus-data

# The core install (what `make demo` needs), then the extras and test tools (what `make test`
# needs). llama-cpp-python ships as source, so the gguf extra compiles llama.cpp: once per machine
# (the wheel is kept in LLAMA_WHEELS, outside the checkout), 8-50 minutes on 2 cores depending on
# load. It is built for AVX2, not for the build machine's own CPU: the native build of 0.3.36 on
# an AVX-512/AMX Xeon segfaulted in every q8_0/q4_0/q4_k_m evaluation (f32/f16 were fine), while
# the AVX2 build of the same source passed (tests/test_gguf.py).
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/azgpt/llama-cpp-avx2
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir "$(LLAMA_CPP)" -w $(LLAMA_WHEELS)
	$(PY) -m pip install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(PY) -m pip install -q -e ".[dev,gguf,serve,crawl]"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.core
	rm -rf $(DEMO) runs/tiny runs/tiny-sft
	$(VENV)/bin/azgpt clean data/sample --out $(DEMO)/clean.txt --report $(DEMO)/clean_report.json
	$(VENV)/bin/azgpt tokenizer train $(DEMO)/clean.txt --vocab-size 2048 --out $(DEMO)/tokenizer
	$(VENV)/bin/azgpt tokenizer stats --tokenizer $(DEMO)/tokenizer data/sample/dialogue.txt
	$(VENV)/bin/azgpt prepare $(DEMO)/clean.txt --tokenizer $(DEMO)/tokenizer --out $(DEMO)/data --val-fraction 0.05
	$(VENV)/bin/azgpt train --config configs/tiny.toml
	$(VENV)/bin/azgpt sample --ckpt runs/tiny/last --prompt "Azərbaycanın paytaxtı" --max-new-tokens 40 --num-samples 2
	$(VENV)/bin/azgpt eval --ckpt runs/tiny/best --tokens $(DEMO)/data/val.npy --probes
	$(VENV)/bin/azgpt report runs/tiny
	$(VENV)/bin/azgpt finetune --ckpt runs/tiny/best --data data/chat --out runs/tiny-sft
	$(VENV)/bin/azgpt eval --ckpt runs/tiny/best --chat runs/tiny-sft/chat_val.jsonl
	$(VENV)/bin/azgpt eval --ckpt runs/tiny-sft/best --chat runs/tiny-sft/chat_val.jsonl
	printf 'Salam!\nAzərbaycanın paytaxtı hansı şəhərdir?\n' | $(VENV)/bin/azgpt chat --ckpt runs/tiny-sft/best --temperature 0 --max-new-tokens 60
	@echo
	@echo "demo done. What each file is (docs/README.md says more, in English and Azerbaijani):"
	@echo "  $(DEMO)/clean.txt            the sample text, repaired and cleaned (what was dropped and why: clean_report.json)"
	@echo "                                  təmizlənmiş mətn"
	@echo "  $(DEMO)/tokenizer/           the vocabulary: how text is cut into tokens, each with a number"
	@echo "                                  lüğət: mətnin tokenlərə bölünməsi"
	@echo "  $(DEMO)/data/                the text as token numbers: train.npy to learn from, val.npy to check on"
	@echo "                                  mətn token nömrələri kimi: öyrənmək və yoxlamaq üçün"
	@echo "  runs/tiny/best               the trained model (weights, shape, history); loss.png its learning curve"
	@echo "                                  öyrədilmiş model; loss.png öyrənmə əyrisi"
	@echo "  runs/tiny/report/report.md   a readable report of the training run"
	@echo "                                  öyrənmənin hesabatı"
	@echo "  runs/tiny-sft/best           the same model taught to chat on data/chat: azgpt chat --ckpt runs/tiny-sft/best"
	@echo "                                  söhbət etməyi öyrənmiş model"
	@echo "The tiny model memorises the tiny sample: the demo shows every stage working, not a useful model."

# The serve playground's browser test drives Debian's chromium (never a downloaded browser);
# installed once per machine when missing (without it that test is skipped).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	(apt-get update -q && apt-get install -y -q chromium) || echo "could not install chromium; the browser test will be skipped"

test: setup $(CHROMIUM)
	$(PY) -m pytest -q

test-all: setup $(CHROMIUM)
	$(PY) -m pytest -q -m "" 

lint: setup
	$(VENV)/bin/ruff check azgpt tests bench
	$(VENV)/bin/ruff format --check azgpt tests bench

bench-cpu: setup
	$(PY) bench/cpu_train.py

# Token files for configs/gpt100m.toml from a real corpus (default: the shared Azerbaijani corpus
# beside this checkout). bench/gpu.sh uses out/az when it exists.
CORPUS ?= ../shared/corpus/az_train
corpus-data: setup
	$(VENV)/bin/azgpt clean $(CORPUS) --out out/az/clean.txt --report out/az/clean_report.json
	$(VENV)/bin/azgpt tokenizer train out/az/clean.txt --out out/az/tokenizer
	$(VENV)/bin/azgpt prepare out/az/clean.txt --tokenizer out/az/tokenizer --out out/az/data
