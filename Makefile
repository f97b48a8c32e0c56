# pydetectron — the commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install deps build test test-all lint demo bench clean

deps:  ## install the pinned torch/torchvision and the other dependencies, only if missing
	@$(PYTHON) -c "import torch, torchvision, sys; \
	sys.exit(0 if (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == ('2.14.1', '0.29.1') else 1)" \
	  2>/dev/null || $(PIP) install -q $(TORCH_PINS)
	@$(PYTHON) -c "import pybind11, ninja, cv2, pycocotools, tensorboardX, scipy, yaml, pytest, ruff, timm" 2>/dev/null \
	  || $(PIP) install -q pybind11 ninja opencv-python-headless pycocotools tensorboardX scipy pyyaml pytest ruff timm

# With nvcc present the CUDA kernels are always compiled (so CI checks they build), even without a GPU; then for
# sm_90 unless a GPU is visible (torch picks its arch) or TORCH_CUDA_ARCH_LIST says otherwise.
FORCE_CUDA ?= $(shell test -x $(CUDA_HOME)/bin/nvcc && echo 1 || echo 0)
TORCH_CUDA_ARCH_LIST ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo 9.0)
export FORCE_CUDA TORCH_CUDA_ARCH_LIST

install: deps  ## install pydetectron in editable mode (builds pydetectron._C, with its CUDA kernels where nvcc is)
	$(PIP) install -q --no-build-isolation -e .

build:  ## rebuild the extension in place after editing csrc/
	$(PYTHON) setup.py -q build_ext --inplace

test: install  ## everything CI runs
	$(PYTHON) -m ruff check lib tools tests setup.py
	$(PYTHON) -m pytest -q -m "not slow" tests

test-all: install  ## the suite plus the long checks
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check lib tools tests setup.py

DEMO_CFG := configs/getting_started/e2e_mask_rcnn_R-18-FPN_shapes.yaml
DEMO_DIR ?= Outputs/demo
DEMO_TRAIN_FLAGS ?=
DEMO_CKPT = "$$(ls -v $(DEMO_DIR)/ckpt/model_step*.pth | tail -1)"

demo: install  ## make the shapes dataset, train Mask R-CNN on it (CPU), evaluate it, draw its detections
	rm -rf $(DEMO_DIR)/ckpt $(DEMO_DIR)/metrics.json && mkdir -p $(DEMO_DIR) && date +%s > $(DEMO_DIR)/started
	@test -f data/shapes/annotations/instances_val.json || $(PYTHON) tools/make_shapes_dataset.py
	$(PYTHON) tools/train_net_step.py --dataset shapes --cfg $(DEMO_CFG) --no_cuda --output_dir $(DEMO_DIR) \
	  $(DEMO_TRAIN_FLAGS)
	$(PYTHON) tools/test_net.py --dataset shapes --cfg $(DEMO_CFG) --load_ckpt $(DEMO_CKPT) --output_dir $(DEMO_DIR)/test
	$(PYTHON) tools/infer_simple.py --dataset shapes --cfg $(DEMO_CFG) --load_ckpt $(DEMO_CKPT) \
	  --images $$(ls data/shapes/val/* | head -6) --output_dir $(DEMO_DIR)/pictures --output_ext png
	@echo "Model: $(DEMO_DIR)/ckpt   metrics: $(DEMO_DIR)/metrics.json   curves: $(DEMO_DIR)/training_curves.png"
	@echo "Detections drawn on val images: $(DEMO_DIR)/pictures"
	@$(PYTHON) tools/demo_summary.py $(DEMO_DIR)

bench: install
	$(PYTHON) tools/benchmark_ops.py

clean:
	rm -rf build lib/pydetectron/*.so lib/*.egg-info
