"""Leaving and entering the project: Hugging Face directories (hf.py) and llama.cpp's GGUF (gguf.py)."""
