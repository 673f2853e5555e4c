"""The benchmarks' one output step: their JSON on stdout and, with --out, the same text in a file."""
import json


def emit(result: dict, out: str | None = None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
