"""The tests never reach a hub: a missing file with a hub copy must fail at once, not retry a network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
