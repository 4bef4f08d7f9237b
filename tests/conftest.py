import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared helpers in tiny.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
