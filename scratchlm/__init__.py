"""scratchlm: a GPT-style language model built from scratch, from raw text to evaluation.

The package follows the pipeline: data/ -> tokenizer/ -> model/ -> train/ -> eval/ -> generate.py
"""

__version__ = "0.1.0"
