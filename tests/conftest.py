"""Test-wide settings: offline, single device in this process, no persistent compile cache
(compile-count tests must see real compiles; the cache has its own test in a subprocess)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["MMJAX_COMPILE_CACHE"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
