"""Source files that `megaloop export --format hf` copies into the export folder, where
transformers loads them with trust_remote_code. They depend on torch, transformers and
sentencepiece only (never on megaloop), so the folder works wherever transformers does."""
