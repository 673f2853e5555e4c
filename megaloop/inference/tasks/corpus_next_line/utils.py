"""Loads the task's bundled examples (no dataset hub involved)."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(**kwargs):
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(os.path.join(HERE, "test.jsonl"))})
