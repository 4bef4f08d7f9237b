"""Export targets. Each module implements the Target interface; registry.py lists them."""
