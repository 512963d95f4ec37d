"""PyTorch interoperability: `export` writes a trained CAL for `torch_model`, which needs torch only."""
