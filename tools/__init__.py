"""Developer tools: training of the demo checkpoint (train_blockdiff.py) and its stdlib corpus (blockdiff_data.py)."""
