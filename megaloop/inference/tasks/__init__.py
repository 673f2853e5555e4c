"""lm-evaluation-harness tasks shipped with megaloop (folders of YAML + data, offline).

TASKS_DIR is given to lm-eval's TaskManager as an include path."""
import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
LOCAL_TASKS = ("corpus_next_line",)
