"""Training loop support: checkpoints (`checkpoint`), metrics logging, progress and run dirs (`logging`)."""
