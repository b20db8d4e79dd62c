# The two commands of README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := blazepose,yolo,dask,export,dev
DEMO := demo-out

.PHONY: setup demo test test-data clean

setup: $(VENV)/.installed

# The environment takes about 7 GiB (torch's CUDA build and its NVIDIA libraries: 5.5 GiB): say so before pip
# runs out of room half-way (a warning, not a refusal: 8 GiB is an estimate, and pip may fit in less).
$(VENV)/.installed: setup.cfg constraints.txt
	@free_gib=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free_gib" -lt 8 ]; then echo "setup: warning: $$free_gib GiB free here; .venv takes about 7 GiB" >&2; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[$(EXTRAS)]'
	# ultralytics (yolo extra) pulls opencv-python beside mediapipe's opencv-contrib-python; both
	# write the same cv2/ folder. Reinstalling the contrib build last, at the same pinned version,
	# leaves one cv2: the superset that both need.
	$(BIN)/pip install -q --no-deps --force-reinstall -c constraints.txt opencv-contrib-python
	$(BIN)/pip check
	touch $@

demo: setup
	$(BIN)/python -m pose_prep.sample_images $(DEMO)/images
	$(BIN)/vsam pose --images $(DEMO)/images --out $(DEMO)/pose --overlays
	@echo "demo: open $(DEMO)/pose/ for keypoints (OpenPose JSON) and overlays (PNG)"
# prep-pose: the same photos with hand-written labels (configs/demo-labels.csv) into HDF5 shards.
	$(BIN)/vsam prep-pose --images $(DEMO)/images --labels configs/demo-labels.csv --out $(DEMO)/shards
	$(BIN)/vsam shards verify $(DEMO)/shards
	@echo "demo: $(DEMO)/shards/ holds the HDF5 shards (vsam shards info $(DEMO)/shards)"
# train: a tiny VSAM on the CPU; --resume makes a second `make demo` continue (or skip) the run
# instead of refusing the folder.
	$(BIN)/vsam train --shards $(DEMO)/shards --out $(DEMO)/run --config configs/tiny.yaml \
		--batch-size 2 --epochs 3 --device cpu --resume
	@echo "demo: $(DEMO)/run/ holds a tiny VSAM: metrics.jsonl, checkpoints/last.pt, tensorboard/"
# predict and explain: the tiny VSAM on the same photos (no pose detector), beside a tiny VGG16 baseline.
	$(BIN)/vsam train --shards $(DEMO)/shards --out $(DEMO)/baseline --config configs/tiny.yaml \
		--model vgg16 --batch-size 2 --epochs 3 --device cpu --resume
	$(BIN)/vsam predict --checkpoint $(DEMO)/run/checkpoints/last.pt --images $(DEMO)/images \
		--out $(DEMO)/predictions.jsonl --device cpu
	$(BIN)/vsam explain --checkpoint $(DEMO)/run/checkpoints/last.pt --baseline $(DEMO)/baseline/checkpoints/last.pt \
		--images $(DEMO)/images --out $(DEMO)/explain --device cpu
	@echo "demo: $(DEMO)/predictions.jsonl has one JSON line per photo; open $(DEMO)/explain/index.html in a browser"
# audit: the labels of the shards that the tiny VSAM disagrees with (a rerun replaces the previous audit).
	$(BIN)/vsam audit --checkpoint $(DEMO)/run/checkpoints/last.pt --shards $(DEMO)/shards --out $(DEMO)/audit \
		--device cpu
	@echo "demo: $(DEMO)/audit/audit.csv ranks the suspect labels; open $(DEMO)/audit/index.html for the gallery"

# The default suite reads only tests/data and what the tests create (setup.cfg deselects `realdata`).
# Two processes (pytest-xdist), each taking whole test files (their module fixtures are built once): one
# process keeps about one core busy, two keep a 2-core machine busy (~2.5 instead of ~4 minutes, the same
# CPU time). `pytest` alone runs the same tests in one process.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not realdata"

# The opt-in real-data suite: the research-only sets in ../shared/data, or VSAM_SHARED_DATA=/path/to/data.
# Fails (never skips) when they are not there.
test-data: setup
	$(BIN)/python -m pytest -q -m realdata

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
