"""Fine-tuning: prompt templates, instruction SFT, classification, LoRA. Start at `templates.py`."""
