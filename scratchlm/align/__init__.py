"""Preference alignment: DPO. Start at `dpo.py` (the loss, written out), then `data.py` (pair formats)."""
