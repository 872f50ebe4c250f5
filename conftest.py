"""Keep test runs (and the notebooks nbval runs) away from the user's caches and results."""

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="osd-test-")
os.environ.setdefault("OSD_CACHE_DIR", os.path.join(_tmp, "cache"))
os.environ.setdefault("OSD_RESULTS_DIR", os.path.join(_tmp, "results"))
os.environ.setdefault("OSD_DATA_DIR", os.path.join(_tmp, "data"))
os.environ.setdefault("MPLBACKEND", "Agg")
