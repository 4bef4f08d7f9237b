"""The Triton performance core. Each file holds one kernel family with its torch reference."""
