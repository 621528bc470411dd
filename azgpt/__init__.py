"""azgpt: train a GPT language model for Azerbaijani from scratch."""

__version__ = "0.1.0"
