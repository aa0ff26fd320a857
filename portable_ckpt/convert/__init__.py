"""Formats in and out: format 0 (``format0``), and foreign checkpoints imported as format 1 (``importers``:
a torch.save state_dict, nanoGPT, Lightning; ``hf_trainer``: a Hugging Face Trainer folder; ``parts``: what a
reader found; ``sources``: the files, read through the format's allowlist)."""
