"""The GPU/CPU worker: loads a diffusers pipeline once and serves generation jobs from RQ."""
