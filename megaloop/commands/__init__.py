"""Command modules of `megaloop` that are neither training nor a library: each holds one command."""
